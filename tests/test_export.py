"""ddim-export: ONNX and FP16 ONNX of both U-Nets, the config inside, the parity gate, safety."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import export_cli
from export import parity
from export.io_spec import BatchProfile, input_profile
from export.pipeline import ExportOptions, ParityError, export_run
from export.tensorrt_build import EngineBuild, manifest, sha256_file, unavailable_reason
from runtime.exportdir import REPORT
from runtime.config import ModelSpec
from runtime.metadata import spec_from_metadata

ROOT = Path(__file__).resolve().parents[1]
COND_INPUT = {"keras": ("noise_variances", (1, 1, 1)), "ddpm": ("timesteps", ())}


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    report = export_run(run_dir, out, ExportOptions(fp16=True))
    return out, report


def test_writes_checked_files_that_pass_the_gate(exported):
    out, report = exported
    engine = ["manifest.json", "model.plan"] if unavailable_reason() is None else []  # a TensorRT GPU machine
    assert sorted(report.files) == sorted([REPORT, "model.fp16.onnx", "model.onnx"] + engine)
    for name in ("model.onnx", "model.fp16.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    cpu = [r for r in report.parity if r.provider == "CPUExecutionProvider"]  # CUDA adds its own where present
    assert [r.file for r in cpu] == ["model.onnx", "model.fp16.onnx"] and all(r.passed for r in report.parity)
    fp32, fp16 = cpu
    assert fp32.passed and fp32.max_rel < 1e-5  # measured ~3e-7
    assert fp16.passed and 1e-6 < fp16.max_rel < parity.FP16_TOLERANCE  # really half precision
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging left
    summary = json.loads((out / REPORT).read_text())
    assert summary["parity"][0]["passed"] is True


def test_the_report_lists_every_file_written(exported):
    out, _ = exported
    listed = json.loads((out / REPORT).read_text())["files"]
    assert listed == sorted(p.name for p in out.iterdir()) and REPORT in listed and "model.fp16.onnx" in listed


def test_graph_io_dynamic_batch_and_opset(exported, run_dir):
    out, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    cond, _ = COND_INPUT[ModelSpec.load(run_dir / "config.json").model.architecture]
    assert [i.name for i in model.graph.input] == ["noisy_images", cond]
    assert [o.name for o in model.graph.output] == ["pred_noises"]
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18


def test_config_round_trips_into_the_runtime(exported, run_dir):
    out, _ = exported
    stored = ModelSpec.load(run_dir / "config.json")
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16")):
        meta = ort.InferenceSession(str(out / name)).get_modelmeta().custom_metadata_map  # what the runtime reads
        spec = spec_from_metadata(meta, name)
        assert (spec.model, spec.schedule, spec.normalization) == (stored.model, stored.schedule, stored.normalization)
        info = spec.extra["export"]
        assert info["precision"] == precision and info["weights"] == "ema"
        assert info["weights_sha256"] == sha256_file(run_dir / "model.safetensors")
        assert info["toolkit_version"] and info["opset"] == 18 and spec.extra["train"]["steps"] == 1


def test_fp16_graph_keeps_embedding_and_normalisation_in_float32(exported):
    out, report = exported
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    kept = [n for n in model.graph.node if n.op_type in ("Sin", "Cos", "BatchNormalization", "InstanceNormalization",
                                                           "Softmax")]
    assert any(n.op_type == "Sin" for n in kept)
    # The angles come straight from the float32 Mul: no float32 -> float16 -> float32 round trip.
    producer = {o: n for n in model.graph.node for o in n.output}
    for trig in (n for n in kept if n.op_type in ("Sin", "Cos")):
        assert producer[trig.input[0]].op_type == "Mul", producer[trig.input[0]].op_type
    for node in kept:
        assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, f"{node.op_type} {node.name} is not float32"
    conv_weights = [types[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in types]
    assert conv_weights and set(conv_weights) == {onnx.TensorProto.FLOAT16}
    assert report.float32_in_fp16[0].startswith("embedding path (") and "Sin" in report.float32_in_fp16[0]


def test_engine_needs_tensorrt_and_a_gpu(exported):
    _, report = exported
    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    assert any("needs TensorRT and a CUDA GPU" in n for n in report.notes)


def test_parity_gate_failure_writes_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("export.pipeline.FP32_TOLERANCE", 0.0)
    with pytest.raises(ParityError, match=r"model.onnx on CPUExecutionProvider differs .* tolerance 0\)"):
        export_run(run_dir, tmp_path / "out", ExportOptions())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_keeps_the_previous_export(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_run(run_dir, out, ExportOptions())
    before = (out / "model.onnx").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("export.pipeline.write_fp16_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_dir, out, ExportOptions(fp16=True, force=True))
    assert (out / "model.onnx").read_bytes() == before and not (out / "model.fp16.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_profile_and_manifest(run_dir, tmp_path):
    spec = ModelSpec.load(run_dir / "config.json")
    shapes = input_profile(spec.model, BatchProfile(1, 4, 8))
    cond, rest = COND_INPUT[spec.model.architecture]
    assert shapes[cond] == ((1, *rest), (4, *rest), (8, *rest))
    assert shapes["noisy_images"][2] == (8, spec.model.channels, spec.model.image_size, spec.model.image_size)
    with pytest.raises(ValueError, match="min-batch <= opt-batch"):
        BatchProfile(4, 2, 8)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    m = manifest(spec, BatchProfile.static(8), onnx_file, EngineBuild("10.9.0", "NVIDIA H100", "9.0", 12.5, 3, "fp16"))
    assert m["profile"]["static"] and m["onnx_sha256"] == sha256_file(onnx_file)
    assert ModelSpec.from_dict(m["config"]).model == spec.model


@pytest.mark.gpu
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"needs TensorRT and a CUDA GPU ({unavailable_reason()})")
def test_tensorrt_engine_and_manifest(run_dir, tmp_path):
    out = tmp_path / "out"
    export_run(run_dir, out, ExportOptions(fp16=True, profile=BatchProfile(1, 2, 4), timing_cache=tmp_path / "tc"))
    data = json.loads((out / "manifest.json").read_text())
    assert (out / "model.plan").stat().st_size > 0 and (tmp_path / "tc").is_file()
    assert data["onnx_file"] == "model.fp16.onnx" and data["precision"] == "fp16"
    assert data["onnx_sha256"] == sha256_file(out / "model.fp16.onnx")
    summary = json.loads((out / REPORT).read_text())
    assert [r["provider"] for r in summary["parity"] if r["file"] == "model.plan"] == ["TensorRT"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return export_cli(*args, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


def test_cli_bad_inputs(run_dir, tmp_path):
    one_line_error(cli(str(tmp_path / "missing"), "--out", str(tmp_path / "o")), "run directory .* does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((run_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage")
    one_line_error(cli(str(bad), "--out", str(tmp_path / "o")), "corrupt weights")
    cfg = json.loads((run_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "schema_version": 7}))
    one_line_error(cli(str(bad), "--out", str(tmp_path / "o")), "schema_version 7 is not supported")
    wider = {"widths": [8, 32]} if cfg["model"]["architecture"] == "keras" else {"base_width": 16}
    (bad / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], **wider}}))
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    one_line_error(cli(str(bad), "--out", str(tmp_path / "o")), "do not match the config's architecture")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_non_empty_out_and_requires_engine_when_asked(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(cli(str(run_dir), "--out", str(out)), "not an export of ddim-export")
    one_line_error(cli(str(run_dir), "--out", str(out), "--force"), "never replaced")
    assert (out / "keep.txt").read_text() == "mine"
    if unavailable_reason() is not None:
        one_line_error(cli(str(run_dir), "--out", str(tmp_path / "e"), "--fp16", "--require-engine"),
                       "needs TensorRT and a CUDA GPU")
        assert not (tmp_path / "e").exists()
    proc = cli(str(run_dir), "--out", str(tmp_path / "ok"), "--fp16")
    assert proc.returncode == 0, proc.stderr
    assert "parity model.fp16.onnx" in proc.stderr and "kept in float32" in proc.stderr


def test_cli_defaults_to_the_latest_run(run_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(run_dir, runs / "only")
    proc = cli(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith("ddim-export: runs/only (the latest run under runs/) -> exports/")
    again = cli(cwd=tmp_path)  # the default folder holds our earlier export: replaced, not refused
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "exports").is_dir()
    (out,) = (tmp_path / "exports").iterdir()
    (out / "NOTES.md").write_text("mine")  # the user's file in it: the default folder is not replaced then either
    one_line_error(cli(cwd=tmp_path), r"files it did not write \(NOTES.md\).*never replaced")
    assert (out / "NOTES.md").read_text() == "mine" and (out / REPORT).is_file()


def test_batchnorm_is_folded_exactly(run_dir, exported):
    import copy

    from export.fold import fold_batchnorm
    from trainer.rundir import load_model

    model, spec = load_model(run_dir)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        pytest.skip("this architecture has no BatchNorm")
    gen = torch.Generator().manual_seed(1)
    for bn in bns:  # statistics far from (0, 1), so a wrong fold cannot hide
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 3 + 0.1)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded, spec.model.image_size, spec.model.channels) == len(bns)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x, v = torch.randn(3, spec.model.channels, 32, 32), torch.rand(3, 1, 1, 1)
    with torch.no_grad():
        ref, got = model(x, v), folded(x, v)
    assert ((got - ref).abs().max() / ref.abs().max().clamp(min=1)).item() < 1e-5
    out, _ = exported
    assert not [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "BatchNormalization"]


def test_engine_branch_wiring_with_stand_ins(run_dir, tmp_path, monkeypatch):
    """The pipeline around the engine (build, gate, manifest, refusal) with ONNX Runtime standing in for
    TensorRT; the TensorRT calls themselves run in the gpu-marked test above."""
    import export.pipeline as pipeline

    built = []

    def fake_build(onnx_path, plan_path, spec, profile, cache, level):
        built.append(onnx_path.name)
        plan_path.write_bytes(onnx_path.read_bytes())
        return manifest(spec, profile, onnx_path, EngineBuild("stand-in", "no GPU", "0.0", 0.1, level, "fp16"))

    def fake_runner(plan_path, spec=None, scale=1.0):
        session = ort.InferenceSession(str(plan_path))
        return lambda feed: session.run(["pred_noises"], feed)[0] * scale

    monkeypatch.setattr(pipeline, "unavailable_reason", lambda: None)
    monkeypatch.setattr(pipeline, "build_engine", fake_build)
    monkeypatch.setattr(pipeline, "engine_runner", fake_runner)
    report = export_run(run_dir, tmp_path / "out", ExportOptions(fp16=True, profile=BatchProfile(1, 2, 4)))
    assert [r.provider for r in report.parity][-1] == "TensorRT" and report.parity[-1].worst_batch in (1, 2, 4)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert built == ["model.fp16.onnx"]  # the engine's precision comes from the FP16 graph
    assert data["onnx_file"] == "model.fp16.onnx"
    assert data["onnx_sha256"] == sha256_file(tmp_path / "out" / "model.fp16.onnx")
    assert data["profile"]["max_batch"] == 4 and (tmp_path / "out" / "model.plan").is_file()
    monkeypatch.setattr(pipeline, "engine_runner", lambda p, spec: fake_runner(p, scale=1.5))
    with pytest.raises(ParityError, match="model.plan on TensorRT"):
        export_run(run_dir, tmp_path / "bad", ExportOptions(fp16=True))
    assert not (tmp_path / "bad").exists()
