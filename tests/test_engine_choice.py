"""``--backend auto`` on the CPU: the fastest gated (engine, precision) pair, timed fairly, once per host."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytest.importorskip("openvino")  # the dev extra installs it (scripts/setup)

from test_runtime import run_cli  # noqa: E402

from runtime.api import load  # noqa: E402
from runtime.backends import engine_choice, precision  # noqa: E402
from runtime.exportdir import REPORT  # noqa: E402

OV_PAIRS = ("openvino/int8", "openvino/fp32", "openvino/bf16")


@pytest.fixture
def timed(tmp_path, monkeypatch) -> list[list[str]]:
    """A private, empty cache; no choice remembered from another test; the pairs of every timing made."""
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    for name in precision.VERDICT_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(precision, "_unwritable", set())
    engine_choice.clear_memo()
    calls: list[list[str]] = []
    real = engine_choice.time_pairs

    def counted(folder: Path, labels: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(list(labels))
        return real(folder, labels, *args, **{**kwargs, "budget_s": 0.2})

    monkeypatch.setattr(engine_choice, "time_pairs", counted)
    yield calls
    engine_choice.clear_memo()


def copy_export(out: Path, dest: Path, edit: Callable[[dict], Any] | None = None) -> Path:
    dest.mkdir(parents=True)
    for name in ("model.onnx", "model.int8.onnx"):
        shutil.copy2(out / name, dest / name)
    report = json.loads((out / REPORT).read_text())
    if edit:
        edit(report)
    (dest / REPORT).write_text(json.dumps(report))
    return dest


def fastest(label: str, factor: float = 2.0) -> Callable[[dict], None]:
    """Rewrite the recorded timing so ``label`` is ``factor`` x faster than every other pair (spread 10%)."""

    def edit(report: dict) -> None:
        timing = report[engine_choice.REPORT_KEY]
        n = str(timing["decide_batch"])
        for p in timing["batch"][n]:
            ms = 10.0 if p == label else 10.0 * factor
            timing["batch"][n][p].update(p10=0.9 * ms, p50=ms, p90=1.1 * ms, first_ms=2 * ms)
            ratio = 10.0 * factor / ms if p != engine_choice.BASELINE else 1.0
            if label == engine_choice.BASELINE:
                ratio = 1.0 if p == label else 1 / factor
            timing["ratio"][n][p].update(p10=0.9 * ratio, p50=ratio, p90=1.1 * ratio)

    return edit


def gated_pairs(report_folder: Path) -> list[str]:
    labels, _ = engine_choice.candidates(report_folder)
    return labels


def test_export_times_every_gated_pair_on_this_host(int8_export):
    out, log = int8_export
    report = json.loads((out / REPORT).read_text())
    timing = report[engine_choice.REPORT_KEY]
    gated = ["onnxruntime/fp32", "onnxruntime/int8"] + [p for p in OV_PAIRS if report["engine_gates"][p]["passed"]]
    assert sorted(timing["pairs"]) == sorted(gated) and timing["pairs"][0] == "onnxruntime/fp32"
    assert timing["host"] == engine_choice.host_fingerprint() and timing["decide_batch"] == 16
    for n in ("1", "16"):
        assert timing["rounds"][n] >= 5
        for p in gated:
            row, ratio = timing["batch"][n][p], timing["ratio"][n][p]
            assert 0 < row["p10"] <= row["p50"] <= row["p90"] and row["first_ms"] > 0
            assert 0 < ratio["p10"] <= ratio["p50"] <= ratio["p90"]
        assert timing["ratio"][n]["onnxruntime/fp32"] == {"p10": 1.0, "p50": 1.0, "p90": 1.0}
    # ONNX Runtime's own precision auto reads its two files' figures, derived from the same rounds
    int8 = report["int8"]["timing"]["batch"]["16"]
    assert int8["fp32_ms"] == timing["batch"]["16"]["onnxruntime/fp32"]["p50"]
    assert int8["int8_ms"] == timing["batch"]["16"]["onnxruntime/int8"]["p50"]
    assert "CPU engines at batch 16" in log and "ddim-run --backend auto on this CPU will run" in log


@pytest.mark.parametrize("winner", ["openvino/int8", "onnxruntime/int8", "onnxruntime/fp32", "openvino/bf16",
                                    "openvino/fp32"])
def test_auto_runs_the_fastest_gated_pair(int8_export, tmp_path, timed, winner):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest(winner))
    if winner not in gated_pairs(folder):
        pytest.skip(f"{winner} is not gated on this CPU")
    sampler = load(folder)  # --backend auto, --precision auto
    engine, prec = winner.split("/")
    assert (sampler.backend.name, sampler.backend.precision) == (engine, prec), sampler.why
    assert sampler.backend.model_path.name == ("model.int8.onnx" if prec == "int8" else "model.onnx")
    if engine == "openvino":
        assert "auto: fastest gated on this CPU, 2.00x onnxruntime/fp32 (p10-p90 1.80-2.20x, batch 16, measured at " \
               "export); then" in sampler.why
    else:
        assert "fastest" in sampler.why and "measured at export" in sampler.why
    got = sampler.sample(2, steps=2, seed=1)
    assert np.isfinite(got.samples).all()
    assert timed == []  # the export's timing was for this host: nothing timed


@pytest.mark.parametrize("edit, why", [
    (lambda g: g["openvino/int8"].update(passed=False), ""),
    (lambda g: g["openvino/int8"].update(sha256="0" * 64), "openvino/int8 not considered: model.int8.onnx changed"),
    (lambda g: g.pop("openvino/int8"), ""),
    (lambda g: g["openvino/int8"].update(passed="true"), ""),  # only the JSON true passes
])
def test_auto_never_runs_an_ungated_pair(int8_export, tmp_path, timed, edit, why):
    folder = copy_export(int8_export[0], tmp_path / "x",
                         lambda r: fastest("openvino/int8")(r) or edit(r["engine_gates"]))
    sampler = load(folder)
    assert (sampler.backend.name, sampler.backend.precision) != ("openvino", "int8"), sampler.why
    assert why in sampler.why
    assert load(folder, "openvino", "cpu", "int8").backend.precision == "int8"  # asked for: always run


def test_a_new_host_times_once_and_caches_the_verdict(int8_export, tmp_path, timed, monkeypatch, caplog):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest("openvino/int8", 100.0))  # "another CPU's"
    real = engine_choice.host_fingerprint
    monkeypatch.setattr(engine_choice, "host_fingerprint",
                        lambda threads=None, openvino=True: {**real(threads, openvino), "cpu": "another CPU"})
    first = load(folder)
    assert len(timed) == 1 and sorted(timed[0]) == sorted(gated_pairs(folder)) and "measured now" in first.why
    engine_choice.clear_memo()  # as a new process would
    second = load(folder)
    assert len(timed) == 1 and "measured earlier on this CPU" in second.why
    assert (second.backend.name, second.backend.precision) == (first.backend.name, first.backend.precision)
    (verdict,) = (tmp_path / "cache" / "int8-verdicts").glob("engines-*.json")
    body = json.loads(verdict.read_text())
    assert body["host"]["cpu"] == "another CPU" and body["kind"] == "engines"
    verdict.write_text(json.dumps({**body, "pairs": ["onnxruntime/fp32"]}))  # edited: its checksum fails
    engine_choice.clear_memo()
    with caplog.at_level(logging.WARNING):
        third = load(folder)
    assert len(timed) == 2 and "measured now" in third.why and "cannot be used" in caplog.text
    monkeypatch.setenv("DDIM_DEPLOY_INT8_CACHE", "0")
    engine_choice.clear_memo()
    assert "measured now" in load(folder).why and len(timed) == 3


def test_without_openvino_auto_is_onnx_runtimes_choice(int8_export, tmp_path, timed, monkeypatch):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest("openvino/int8"))
    monkeypatch.setattr(engine_choice, "openvino_version", lambda: None)
    sampler = load(folder)
    assert sampler.backend.name == "onnxruntime" and "precision auto:" in sampler.why
    assert "OpenVINO not installed" in sampler.why and timed == []


def test_openvino_asked_runs_its_fastest_gated_precision(int8_export, tmp_path, timed):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest("openvino/int8"))
    sampler = load(folder, "openvino", "cpu")
    assert sampler.backend.precision == "int8" and "asked for; auto: fastest gated" in sampler.why
    assert load(folder, "openvino", "cpu", "fp32").backend.precision == "fp32"
    folder = copy_export(int8_export[0], tmp_path / "y", lambda r: r.pop("engine_gates"))  # nothing gated
    assert load(folder, "openvino", "cpu").backend.precision == "fp32" and timed == []


def test_precision_asked_with_auto_picks_the_faster_engine(int8_export, tmp_path, timed):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest("openvino/int8"))
    assert load(folder, precision="int8").backend.name == "openvino"
    folder = copy_export(int8_export[0], tmp_path / "y", fastest("onnxruntime/int8"))
    assert load(folder, precision="int8").backend.name == "onnxruntime"
    assert load(folder, precision="fp32").backend.model_path.name == "model.onnx"


def test_ddim_run_prints_the_pair_its_ratio_and_spread(int8_export, tmp_path):
    folder = copy_export(int8_export[0], tmp_path / "x", fastest("openvino/int8", 3.0))
    proc = run_cli(str(folder), "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "g.png"),
                   "--no-progress", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "openvino CPU model.int8.onnx int8" in x)
    assert "auto: fastest gated on this CPU, 3.00x onnxruntime/fp32 (p10-p90 2.70-3.30x, batch 16, measured at " \
           "export)" in line


# ---- the timing itself, on a fake clock -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_opener(clock: FakeClock, costs: dict[str, float], cold: float, slow_rounds: set[int]) -> Callable:
    """Backends whose forward advances ``clock`` by their cost; the first call of each costs ``cold`` more, and
    during ``slow_rounds`` (counted on the reference's calls) the whole machine is 3x slower."""
    from runtime.config import KerasUNetConfig

    calls = {"ref": 0}

    class Fake:
        def __init__(self, label: str) -> None:
            self.label, self.n = label, 0
            self.spec = type("S", (), {"model": KerasUNetConfig(image_size=8, channels=1, widths=(8,), block_depth=1,
                                                                embedding_dims=8)})()

        def denoise(self, x: np.ndarray, cond: float) -> np.ndarray:
            if self.label == engine_choice.BASELINE:
                calls["ref"] += 1
            slow = 3.0 if calls["ref"] - 2 in slow_rounds else 1.0  # two warm-up calls first
            clock.now += costs[self.label] * slow + (cold if self.n == 0 else 0.0)
            self.n += 1
            return x

    return lambda folder, label, threads: Fake(label)


def test_timing_discards_cold_calls_and_shows_load_as_spread():
    clock = FakeClock()
    costs = {"onnxruntime/fp32": 0.040, "openvino/int8": 0.010, "onnxruntime/int8": 0.020}
    opener = fake_opener(clock, costs, cold=5.0, slow_rounds={1, 2})
    timing = engine_choice.time_pairs(Path("."), ["openvino/int8", "onnxruntime/int8"], batches=(16,), budget_s=1.0,
                                      min_rounds=10, clock=clock, opener=opener)
    row, ratio = timing["batch"]["16"], timing["ratio"]["16"]
    assert timing["pairs"][0] == "onnxruntime/fp32"  # the reference is always timed
    assert row["openvino/int8"]["p50"] == pytest.approx(10.0) and row["onnxruntime/fp32"]["p50"] == pytest.approx(40.0)
    assert row["openvino/int8"]["first_ms"] == pytest.approx(5010.0)  # the cold call is recorded, never a sample
    assert row["openvino/int8"]["p90"] > row["openvino/int8"]["p50"]  # the slow rounds widen the spread
    assert ratio["openvino/int8"]["p50"] == pytest.approx(4.0)  # ratios within a round: load cancels out
    assert timing["rounds"]["16"] >= 10
    report = {"cpu_timing": {**timing, "host": engine_choice.host_fingerprint()}}
    lines = engine_choice.timing_lines(report["cpu_timing"])
    assert "will run openvino/int8" in lines[0] and lines[1].strip().startswith("openvino/int8")


def test_a_long_compile_loses_to_a_nearly_as_fast_pair(int8_export, tmp_path, timed):
    """ddim-run's default job is 200 forwards: a pair 2% faster per forward that compiles for 2 s more is slower."""

    def edit(report: dict) -> None:
        fastest("openvino/int8")(report)
        row = report[engine_choice.REPORT_KEY]["batch"]["16"]
        row["openvino/int8"].update(p50=9.8, first_ms=2000.0)
        row["openvino/fp32"].update(p50=10.0, first_ms=200.0)

    folder = copy_export(int8_export[0], tmp_path / "x", edit)
    if not {"openvino/fp32", "openvino/int8"} <= set(gated_pairs(folder)):
        pytest.skip("both OpenVINO pairs are not gated here")
    assert engine_choice.job_ms({"first_ms": 2000.0, "p50": 9.8}) > engine_choice.job_ms({"first_ms": 200.0, "p50": 10.0})
    sampler = load(folder)
    assert (sampler.backend.name, sampler.backend.precision) == ("openvino", "fp32"), sampler.why
