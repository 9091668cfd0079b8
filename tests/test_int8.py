"""INT8 export: calibration across the schedule, what stays float32, the quality gate, the runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_export import cli, one_line_error, run_dir  # noqa: F401 (the tiny keras / ddpm runs)

from export.int8 import (KEEP_FLOAT, GateOptions, Int8Options, calibration_batches, data_pairs, float_nodes,
                         quality_gate, stratified_variances)
from export.onnx_graph import embedding_nodes
from runtime.api import load
from runtime.config import ScheduleConfig
from runtime.schedule import build_schedule, noise_variance
from trainer.checkpoint import read_spec
from trainer.data import model_split_images

LOOSE = ("--int8-min-psnr", "0", "--int8-max-fd-ratio", "1000", "--int8-gate-images", "4",
         "--int8-calibration-size", "32")


@pytest.fixture(scope="module")
def int8_export(run_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("int8") / "out"
    proc = cli(str(run_dir), "--out", str(out), "--int8", "--data", str(run_dir.parent / "fmnist"), *LOOSE)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def test_int8_file_is_quantized_except_what_is_kept_float(int8_export):
    out, log = int8_export
    graph = onnx.load(str(out / "model.int8.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["ddim_deploy.config"])["export"]["precision"] == "int8"
    nodes = {n.name: n for n in graph.graph.node}
    dq_outputs = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_inputs = {i for n in graph.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    reads_int8 = [c for c in convs if any(i in dq_outputs for i in c.input[1:])]  # int8 weights
    assert len(reads_int8) == len(convs) - 2  # all but the first and the last
    assert not any(i in dq_outputs for i in convs[0].input[1:]) and not any(i in dq_outputs for i in convs[-1].input[1:])
    fp32 = onnx.load(str(out / "model.onnx"))
    for name in embedding_nodes(fp32.graph):  # the angles never pass through 8 bits
        assert not any(i in dq_outputs for i in nodes[name].input), name
        assert not any(o in q_inputs for o in nodes[name].output if nodes[name].op_type == "Mul"), name
    report = json.loads((out / "export_report.json").read_text())["int8"]
    assert [k.split(" ")[0] for k in report["kept_float32"]] == ["embedding", "first", "last"]
    assert report["gate"]["passed"] and report["gate"]["n"] == 4
    assert "INT8 quality gate on 4 images x 50 steps" in log and "kept in float32 in the INT8 graph" in log


def test_runtime_runs_int8_close_to_float32(int8_export):
    out, _ = int8_export
    fp32 = load(out, "onnxruntime", "cpu", "fp32").sample(4, steps=5, seed=3)
    int8 = load(out, "onnxruntime", "cpu", "int8")
    assert int8.backend.model_path.name == "model.int8.onnx"
    got = int8.sample(4, steps=5, seed=3)
    assert got.images.shape == fp32.images.shape and np.isfinite(got.samples).all()
    # Quantized, not identical, but tracking the float32 model (outputs are of unit scale).
    err = np.abs(got.samples - fp32.samples).mean() / np.abs(fp32.samples).mean()
    assert 0 < err < 0.5


def test_gate_failure_writes_nothing(run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli(str(run_dir), "--out", str(out), "--int8", "--data", str(run_dir.parent / "fmnist"),
               "--int8-gate-images", "4", "--int8-calibration-size", "16", "--int8-min-psnr", "300")
    one_line_error(proc, r"INT8 quality gate failed: same-noise PSNR .* < 300 dB; nothing was written")
    assert not out.exists()


def test_calibration_spans_the_schedule():
    spec_schedule = ScheduleConfig(name="linear", num_timesteps=1000)
    rng = np.random.default_rng(0)

    class Spec:
        schedule = spec_schedule

    v = np.sort(stratified_variances(Spec, 64, rng))  # type: ignore[arg-type]
    full = noise_variance(build_schedule(spec_schedule), np.arange(1000))
    # One draw per stratum of 1000/64 steps: from the cleanest to the noisiest end.
    assert v[0] <= full[16] and v[-1] >= full[1000 - 16]
    assert np.all(np.diff(v) > 0)


def test_data_pairs_noise_real_images(run_dir):  # noqa: F811
    spec = read_spec(run_dir)
    images = np.full((5, 1, 32, 32), 255, np.uint8)
    pairs = list(data_pairs(spec, images, 40, np.random.default_rng(0)))
    assert len(pairs) == 40 and pairs[0][0].shape == (1, 32, 32) and pairs[0][1].shape == (1, 1, 1)
    x0 = (1.0 - spec.normalization.mean[0]) / spec.normalization.std[0]
    for x, v in pairs:  # the clean part of x_t is sqrt(1 - v) * x0; the rest is unit Gaussian noise of variance v
        resid = x - np.sqrt(1 - v) * x0
        assert abs(resid.std() - np.sqrt(v.item())) < 0.1


def test_calibration_mixes_data_and_sampler_trajectories(int8_export, run_dir):  # noqa: F811
    out, _ = int8_export
    spec = read_spec(run_dir)
    images = np.zeros((8, 1, 32, 32), np.uint8)
    feeds = calibration_batches(out / "model.onnx", spec, lambda: images,
                                Int8Options(calibration="both", calibration_size=40, calibration_steps=5, batch=16))
    assert [len(f["noisy_images"]) for f in feeds] == [16, 16, 8]
    variances = np.concatenate([f["noise_variances"].ravel() for f in feeds])
    assert len(np.unique(variances)) < 40  # trajectories share their steps' variances; data pairs do not


def test_float_nodes_refuses_unknown_parts(int8_export):
    out, _ = int8_export
    graph = onnx.load(str(out / "model.onnx")).graph
    assert float_nodes(graph, ())[0] == []
    assert len(float_nodes(graph, KEEP_FLOAT)[1]) == 3
    with pytest.raises(ValueError, match="cannot keep attention"):
        float_nodes(graph, ("attention",))


def test_quantizer_asks_for_pre_processing_at_most_once(int8_export):
    _, log = int8_export
    # ONNX Runtime's quantizer logs "Please consider (to run) pre-processing before quantization" twice per
    # call unless the model went through its pre-processing.
    assert log.count("pre-processing before quantization") <= 1, log


def test_gate_shows_progress_unless_told_not_to(int8_export, run_dir, capsys):  # noqa: F811
    out, log = int8_export
    assert "INT8 quality gate: 100%" in log and "100/100" in log  # the export's default: 2 files x 50 steps x 1 batch
    spec = read_spec(run_dir)
    images = lambda: model_split_images(spec, "train", run_dir.parent / "fmnist")  # noqa: E731
    for progress in (False, True):
        gate = quality_gate(out / "model.onnx", out / "model.int8.onnx", spec, images,
                            GateOptions(images=2, steps=3, reference_images=16), progress)
        err = capsys.readouterr().err
        assert gate.n == 2 and ("INT8 quality gate" in err and "6/6" in err) == progress, err
