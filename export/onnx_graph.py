"""The denoiser as ONNX: export, simplification, metadata, and the FP16 conversion.

FP16 keeps in float32 (see docs/design.md): the sinusoidal-embedding path from the conditioning input
(``noise_variances`` or ``timesteps``) up to Sin/Cos (angles reach 2 pi 1000 * variance or 999 radians,
beyond fp16), every normalisation node (BatchNorm,
InstanceNorm - the legacy exporter's form of GroupNorm - GroupNorm, LayerNorm: their statistics
overflow or lose precision in fp16), and Softmax (exponentials of attention logits). Inputs and
outputs stay float32.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnxconverter_common import float16

from export.io_spec import OUTPUT_NAMES, dynamic_axes, input_names_of, tensor_shapes
from runtime.config import ModelSpec

log = logging.getLogger(__name__)

OPSET = 18
KEEP_FLOAT32_OPS = ("BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
                    "Softmax", "Sin", "Cos")


def export_onnx(model: torch.nn.Module, spec: ModelSpec, path: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``model`` (eval mode) to ONNX with a dynamic batch, simplify it, and return it (not saved)."""
    import onnxslim

    shapes = tensor_shapes(spec.model, 2)
    names = input_names_of(spec.model)
    dummy = tuple(torch.rand(*shapes[name]) for name in names)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Constants the trace records on purpose (the embedding's speeds, static image sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, dummy, str(path), input_names=list(names), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic_axes(spec.model), opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    slim = onnxslim.slim(onnx.load(str(path)))  # constant folding, dead nodes, redundant casts/reshapes
    for i, node in enumerate(slim.graph.node):  # FP16 block lists and TensorRT layer precisions go by name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return slim


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the model's ``metadata_props`` entries named in ``props``."""
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def embedding_nodes(graph: onnx.GraphProto, source: str | None = None) -> list[str]:
    """Names of the nodes on the paths from ``source`` (default: the graph's conditioning input, its second)
    up to and including the Sin / Cos nodes."""
    if source is None:
        source = graph.input[1].name if len(graph.input) > 1 else ""
    reached, names = {source}, []
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.name in names or not reached.intersection(node.input):
                continue
            names.append(node.name)
            changed = True
            if node.op_type not in ("Sin", "Cos"):  # the angles end the float32-only path
                reached.update(node.output)
    return names


def float32_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes an FP16 graph must keep in float32 (see the module docstring)."""
    embed = set(embedding_nodes(model.graph))
    return [n for n in model.graph.node if n.name in embed or n.op_type in KEEP_FLOAT32_OPS]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and compute, float32 I/O, embedding / normalisation / softmax kept in float32."""
    src = onnx.ModelProto()
    src.CopyFrom(model)
    # Stale value_info makes the converter type blocked nodes' outputs as fp16; shapes are re-inferred.
    del src.graph.value_info[:]
    keep = [n.name for n in float32_nodes(src)]
    with warnings.catch_warnings():  # weights below fp16's range are flushed (the converter says so per value)
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(
            src, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(KEEP_FLOAT32_OPS),
            node_block_list=keep,
        )
    drop_round_trip_casts(half)
    return half


def drop_round_trip_casts(model: onnx.ModelProto) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs; returns how many were removed.

    The converter casts every kept-float32 node's output to float16, even where the only consumers
    are kept-float32 nodes that cast it straight back: between the embedding's Mul and Sin / Cos
    that rounds the angles (up to 2 pi 1000) to float16, the very loss docs/design.md forbids.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    dead: set[int] = set()
    for down in graph.node:  # float32 -> float16 casts whose every consumer casts back to float32
        users = consumers.get(down.output[0], [])
        if cast_to(down) != onnx.TensorProto.FLOAT16 or down.output[0] in outputs or not users:
            continue
        if all(cast_to(u) == onnx.TensorProto.FLOAT and u.output[0] not in outputs for u in users):
            dead.add(id(down))
            for up in users:
                dead.add(id(up))
                rename[up.output[0]] = down.input[0]
    if not dead:
        return 0
    kept = [n for n in graph.node if id(n) not in dead]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dead) // 2


def graph_precision(model: onnx.ModelProto) -> str:
    """What a graph computes in: "int8" (Q/DQ nodes), "fp16" (float16 weights or casts), else "fp32"."""
    graph = model.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in graph.node):
        return "fp16"
    return "fp32"


def check(path: Path) -> None:
    """onnx's full checker (with shape inference) on the file as written."""
    onnx.checker.check_model(str(path), full_check=True)


def save_checked(graph: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> None:
    """Store ``metadata`` in ``graph``, write it to ``path`` and run the full checker on the file."""
    set_metadata(graph, metadata)
    onnx.save(graph, str(path))
    check(path)


def write_fp16_onnx(fp32: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """``model.fp16.onnx``: :func:`to_fp16` of the deployed float32 graph, config inside, checked."""
    half = to_fp16(fp32)
    save_checked(half, path, metadata)
    return half


def write_deployed_onnx(model: torch.nn.Module, spec: ModelSpec, path: Path, metadata: dict[str, str],
                        opset: int = OPSET) -> tuple[onnx.ModelProto, int]:
    """The float32 ONNX that ships: a copy of ``model`` with BatchNorm folded, exported, config inside.

    Returns the graph and how many BatchNorm layers were folded; ``model`` itself is untouched (it
    stays the eager reference the parity gate compares with).
    """
    from export.fold import fold_batchnorm

    deployed = copy.deepcopy(model)
    folded = fold_batchnorm(deployed, spec.model.image_size, spec.model.channels)
    graph = export_onnx(deployed, spec, path, opset)
    save_checked(graph, path, metadata)
    return graph, folded
