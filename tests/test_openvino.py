"""The OpenVINO backend: parity with ONNX Runtime (fp32, int8, bf16 where the CPU has it), full sampling through
ddim-run, its row in the backend table, and its one-line refusals."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("openvino")  # the dev extra installs it (scripts/setup); a runtime-only install skips

from test_runtime import run_cli  # noqa: E402

from runtime.backends import openvino_backend  # noqa: E402
from runtime.backends.base import BackendError  # noqa: E402
from runtime.backends.registry import names, open_backend, table  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402

# OpenVINO fp32 against ONNX Runtime fp32, max |difference| / max |ORT|: measured <= 7e-7 on the shipped model and
# the tiny exports (batches 1, 3, 16; AMX Xeon, OpenVINO 2026.4); fp32 must not drift into bf16 (~1e-2).
FP32_TOLERANCE = 1e-5
# The same QDQ file on both engines: each fuses the quantised convolutions its own way; OpenVINO INT8's distance
# from float32 at most this many times ONNX Runtime INT8's.
INT8_VS_ORT_ERROR = 1.5
# bfloat16 (8-bit mantissa) against float32: measured ~1e-2 on the shipped model.
BF16_TOLERANCE = 5e-2
LEVELS = (0.0004, 0.02, 0.3, 0.9, 0.9996)  # noise variances (ddpm: timesteps scaled to [0, T))


def _conds(backend) -> list[float]:
    if backend.spec.model.conditioning == "timestep":
        return [round(v * (backend.spec.schedule.num_timesteps - 1)) for v in LEVELS]
    return list(LEVELS)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def worst(folder, a: tuple[str, str], b: tuple[str, str]) -> float:
    """The largest max_rel of backend ``a``'s predicted noise against ``b``'s ((backend, precision) each), same
    inputs, batches 1 and 3, every level of :data:`LEVELS`."""
    x_backend, why = open_backend(folder, a[0], "cpu", a[1])
    y_backend, _ = open_backend(folder, b[0], "cpu", b[1])
    assert (x_backend.spec.model, x_backend.spec.schedule) == (y_backend.spec.model, y_backend.spec.schedule)
    if a[0] == "openvino":
        assert why.startswith(f"openvino CPU {x_backend.model_path.name} {a[1]}")
    rng = np.random.default_rng(0)
    m = x_backend.spec.model
    found = 0.0
    for n in (1, 3):
        x = rng.standard_normal((n, m.channels, m.image_size, m.image_size), dtype=np.float32)
        for cond in _conds(x_backend):
            got, want = x_backend.denoise(x, cond), y_backend.denoise(x, cond)
            assert got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all()
            found = max(found, max_rel(got, want))
    return found


def test_fp32_matches_onnxruntime_on_the_shipped_model():
    assert worst(SHIPPED_MODEL, ("openvino", "fp32"), ("onnxruntime", "fp32")) < FP32_TOLERANCE


def test_fp32_and_int8_match_onnxruntime_on_tiny_exports(int8_export):
    out, _ = int8_export
    assert worst(out, ("openvino", "fp32"), ("onnxruntime", "fp32")) < FP32_TOLERANCE
    # The tiny 1-step nets predict noise of ~0.04 at most, which INT8 does not resolve (ONNX Runtime's own INT8 is
    # 2-3x max|fp32| off): OpenVINO's INT8 must be no further from float32 than ONNX Runtime's, within 1.5x
    # (measured 0.85-1.15x). Close agreement of the two INT8 engines is measured on a trained model (see the top).
    ov8 = worst(out, ("openvino", "int8"), ("onnxruntime", "fp32"))
    ort8 = worst(out, ("onnxruntime", "int8"), ("onnxruntime", "fp32"))
    assert ov8 <= INT8_VS_ORT_ERROR * ort8, (ov8, ort8)


def test_bf16_is_close_to_float32():
    if "BF16" not in openvino_backend.cpu_capabilities(openvino_backend.ov.Core()):
        pytest.skip("this CPU has no BF16 (OpenVINO's OPTIMIZATION_CAPABILITIES): bf16 is refused here")
    found = worst(SHIPPED_MODEL, ("openvino", "bf16"), ("onnxruntime", "fp32"))
    assert 1e-5 < found < BF16_TOLERANCE  # and really bfloat16, not float32 under another name


def test_batches_compile_once_per_bucket_and_the_cache_is_bounded():
    ov, _ = open_backend(SHIPPED_MODEL, "openvino", "cpu", "fp32")
    x = np.zeros((1, 1, 32, 32), np.float32)
    first = ov.denoise(x, 0.5)
    assert [openvino_backend.bucket(n) for n in (1, 2, 3, 5, 16, 17, 256, 300)] == [1, 2, 4, 8, 16, 32, 256, 300]
    for n in range(2, 41):  # buckets 2, 4, 8, 16, 32, 64: one compile each, the least recently used (1) dropped
        assert ov.denoise(np.zeros((n, 1, 32, 32), np.float32), 0.5).shape == (n, 1, 32, 32)
    assert sorted(ov._compiled) == [2, 4, 8, 16, 32, 64] and len(ov._compiled) == openvino_backend.MAX_COMPILED
    np.testing.assert_array_equal(ov.denoise(x, 0.5), first)  # compiled again, same answer
    rng = np.random.default_rng(0)
    three = rng.standard_normal((3, 1, 32, 32), dtype=np.float32)
    padded = ov.denoise(three, 0.5)  # runs as 4, the padding cut off
    four = ov.denoise(np.concatenate([three, rng.standard_normal((1, 1, 32, 32), dtype=np.float32)]), 0.5)
    np.testing.assert_allclose(padded, four[:3], rtol=0, atol=1e-5)  # each image on its own
    out = ov.denoise(x, 0.5)
    ov.denoise(x + 1, 0.5)
    np.testing.assert_array_equal(out, first)  # a result is the caller's: the next call does not overwrite it


def _images(tmp_path, backend: str, *extra: str) -> np.ndarray:
    npz = tmp_path / f"{backend}.npz"
    proc = run_cli(str(SHIPPED_MODEL), "--backend", backend, "--steps", "5", "--num-images", "4", "--batch-size", "3",
                   "--seed", "7", "--npz", str(npz), "--out", str(tmp_path / f"{backend}.png"), "--no-progress",
                   *extra, block_torch=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr, np.load(npz)["images"]


def test_ddim_run_on_openvino_matches_onnxruntime(tmp_path):
    log, ov = _images(tmp_path, "openvino", "--precision", "fp32")
    _, ort = _images(tmp_path, "onnxruntime", "--precision", "fp32")
    assert "backend: openvino CPU model.onnx fp32" in log
    assert ov.dtype == np.uint8 and ov.shape == ort.shape == (4, 32, 32, 1)
    assert int(np.abs(ov.astype(int) - ort.astype(int)).max()) <= 1  # measured 0 (uint8 levels)


@pytest.fixture
def fp32_only(tmp_path):
    """The shipped model's float32 ONNX alone: no INT8 file, no report of gates."""
    import shutil

    shutil.copy2(SHIPPED_MODEL / "model.onnx", tmp_path / "model.onnx")
    return tmp_path


def test_the_table_row_serves_and_auto_takes_it_only_where_gated(fp32_only):
    row = table()["openvino"]
    assert row.serve and row.label == "OpenVINO"
    assert table()["tensorrt"].auto_rank < row.auto_rank < table()["onnxruntime"].auto_rank
    assert "openvino" in names(serve=True)
    _, why = open_backend(fp32_only, "auto", "cpu")  # nothing gated: ONNX Runtime fp32, nothing timed
    assert why.startswith("onnxruntime") and "openvino" not in why.lower()
    _, why = open_backend(fp32_only / "model.onnx", "auto", "cpu")  # a bare file: no report to trust
    assert why.startswith("onnxruntime")


def test_missing_int8_file_is_one_line(fp32_only):
    with pytest.raises(BackendError, match=r"no model at .*model.int8.onnx \(export one with ddim-export --int8\)"):
        open_backend(fp32_only, "openvino", "cpu", "int8")


def test_bf16_without_the_instructions_is_refused(monkeypatch):
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda core: ["FP32", "FP16", "INT8", "BIN"])
    with pytest.raises(BackendError) as err:
        open_backend(SHIPPED_MODEL, "openvino", "cpu", "bf16")
    assert "\n" not in str(err.value)
    assert "this CPU has no bfloat16 instructions (OpenVINO lists FP32, FP16, INT8, BIN" in str(err.value)


def test_other_precisions_and_devices_are_one_line():
    for kwargs, pattern in (({"precision": "fp16"}, r"--precision fp16: OpenVINO runs fp32, bf16, int8"),
                            ({"device": "cuda"}, r"--device cuda: the OpenVINO backend runs on the CPU")):
        with pytest.raises(BackendError, match=pattern):
            open_backend(SHIPPED_MODEL, "openvino", **kwargs)
    with pytest.raises(BackendError, match=r"--precision bf16 runs on OpenVINO \(--backend openvino\)"):
        open_backend(SHIPPED_MODEL, "onnxruntime", "cpu", "bf16")


def test_without_the_package_it_names_the_install_and_auto_is_unaffected(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    monkeypatch.delitem(sys.modules, "runtime.backends.openvino_backend")
    with pytest.raises(BackendError) as err:
        open_backend(SHIPPED_MODEL, "openvino")
    assert str(err.value).startswith("OpenVINO is not installed: pip install 'openvino")
    assert "(in a ddim-deploy clone: pip install -e '.[openvino]')" in str(err.value) and "\n" not in str(err.value)
    _, why = open_backend(SHIPPED_MODEL, "auto", "cpu")
    assert why.startswith("onnxruntime")


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from conftest import externalize_largest_initializer

    (tmp_path / "exp").mkdir()
    externalize_largest_initializer(SHIPPED_MODEL / "model.onnx", tmp_path / "exp" / "model.onnx",
                                    tmp_path / "secret.bin", "../secret.bin")
    with pytest.raises(BackendError, match=r"cannot load .*model.onnx: Path '../secret.bin' resolves to .* outside"):
        open_backend(tmp_path / "exp", "openvino", "cpu")
