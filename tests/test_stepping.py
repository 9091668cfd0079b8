"""Step-level batching (runtime/stepping.py): images at different steps of different plans share each network call,
and every one still equals ddim-run's image bit for bit, on every CPU engine, both U-Nets and the eager backend."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.api import load
from runtime.common.shipped import SHIPPED_MODEL
from runtime.settings import SamplingSettings as S
from runtime.stepping import StepBatch

# (arrives before step, seed, index, settings): every solver, eta 0 / 0.5 / 1, clipping on and off, spacings, a
# 1-step plan, images of one request arriving at different steps.
CONTINUOUS = [(0, 3, 0, S(steps=6)), (0, 3, 1, S(steps=6)), (1, 5, 2, S(steps=7, eta=0.5)),
              (2, 1, 0, S(steps=5, solver="dpmpp-2m")), (2, 2, 4, S(steps=4, clip_x0=True)),
              (3, 9, 1, S(steps=5, solver="dpmpp-2m", clip_x0=True)),
              (4, 7, 0, S(steps=8, eta=1.0, clip_x0=True, spacing="quadratic")), (5, 3, 2, S(steps=3)),
              (6, 4, 0, S(steps=1))]
DISCRETE = [(0, 3, 0, S(steps=6)), (1, 5, 2, S(steps=7, eta=0.5, spacing="trailing")),
            (1, 1, 0, S(steps=5, solver="dpmpp-2m")), (2, 2, 4, S(steps=4, clip_x0=True, spacing="leading")),
            (3, 9, 1, S(steps=6, solver="dpmpp-2m", spacing="uniform", clip_x0=True)), (4, 6, 0, S(steps=2, eta=1.0))]


def run_staggered(batch: StepBatch, jobs, capacity_wait: bool = False) -> dict:
    """Admit each job before its step (or later, when the batch is full); step until all are done."""
    got, pending, t = {}, list(jobs), 0
    while pending or len(batch):
        for job in [j for j in pending if j[0] <= t][:batch.free]:
            batch.add(job[1:], job[1], job[2], job[3])
            pending.remove(job)
        for f in batch.step():
            assert f.error is None, f.error
            got[f.lane.key] = f.sample
        t += 1
    return got


def assert_as_ddim_run(sampler, got: dict, jobs) -> None:
    for _, seed, index, settings in jobs:
        ref = sampler.sample_images([(seed, index)], settings).samples[0]
        np.testing.assert_array_equal(got[(seed, index, settings)], ref, err_msg=f"{seed}, {index}, {settings}")


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                                ("openvino", "fp32"), ("openvino", "bf16")])
def test_staggered_mixed_images_equal_ddim_run_bit_for_bit(backend, precision):
    if backend == "openvino":
        pytest.importorskip("openvino")
    sampler = load(SHIPPED_MODEL, backend, "cpu", precision)
    batch = StepBatch(sampler, 16)
    got = run_staggered(batch, CONTINUOUS)
    assert_as_ddim_run(sampler, got, CONTINUOUS)


def test_both_unets_on_exported_engines_and_the_eager_backend(int8_export, run_dir):
    """The DDPM U-Net takes timesteps on a discrete schedule (trailing/leading spacings). Eager PyTorch on the CPU is
    not batch-invariant itself (oneDNN picks convolution kernels by batch size: ~1e-8 apart), so there the update is
    checked bit for bit in lockstep (the batches ddim-run forms) and staggered within float32 noise."""
    out, _ = int8_export
    sampler = load(out, "onnxruntime", "cpu", "fp32")
    jobs = DISCRETE if sampler.schedule.discrete else CONTINUOUS
    got = run_staggered(StepBatch(sampler, 4), jobs)  # 4 slots: later images wait for free ones
    assert_as_ddim_run(sampler, got, jobs)

    eager = load(run_dir, "torch", "cpu")
    for settings in (S(steps=4, eta=0.5, clip_x0=True), S(steps=4, solver="dpmpp-2m")):
        lockstep = run_staggered(StepBatch(eager, 3), [(0, 5, i, settings) for i in range(3)])
        ref = eager.sample(3, settings, seed=5, batch_size=3).samples
        np.testing.assert_array_equal(np.stack([lockstep[(5, i, settings)] for i in range(3)]), ref)
    got = run_staggered(StepBatch(eager, 4), jobs)
    for _, seed, index, settings in jobs:
        ref = eager.sample_images([(seed, index)], settings).samples[0]
        np.testing.assert_allclose(got[(seed, index, settings)], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class OneLevelPerCall:
    """An engine that takes one noise level per call: the batch calls it once per level."""

    per_image_cond = False

    def __init__(self, backend) -> None:
        self.inner, self.levels = backend, []
        self.spec, self.name, self.device, self.precision = backend.spec, "one-level", "cpu", "fp32"

    def denoise(self, x, cond):
        assert np.ndim(cond) == 0
        self.levels.append((x.shape[0], cond))
        return self.inner.denoise(x, cond)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_engine_without_per_image_levels_is_called_once_per_level():
    from runtime.api import Sampler

    inner = load(SHIPPED_MODEL, "onnxruntime", "cpu", "fp32")
    wrapped = OneLevelPerCall(inner.backend)
    sampler = Sampler(wrapped)
    jobs = CONTINUOUS[:5]
    got = run_staggered(StepBatch(sampler, 16), jobs)
    assert_as_ddim_run(inner, got, jobs)
    assert any(n > 1 for n, _ in wrapped.levels)  # images at one level shared a call


def test_a_parked_image_resumes_where_it_was_and_capacity_is_the_engines():
    sampler = load(SHIPPED_MODEL, "onnxruntime", "cpu", "fp32")
    batch = StepBatch(sampler, 3)
    for seed in range(3):
        batch.add(seed, seed, 0, S(steps=6, solver="dpmpp-2m" if seed == 1 else "ddim", eta=0.5 if seed == 2 else 0))
    with pytest.raises(RuntimeError, match="full"):
        batch.add(9, 9, 0, S(steps=2))
    batch.step()
    batch.step()
    (parked,) = batch.park([1])  # DPM-Solver++: its history goes with it
    assert parked.k == 2 and len(batch) == 2 and batch.free == 1
    batch.step()
    batch.resume(parked)
    got = {}
    while len(batch):
        got.update({f.lane.key: f.sample for f in batch.step()})
    for seed in range(3):
        settings = S(steps=6, solver="dpmpp-2m" if seed == 1 else "ddim", eta=0.5 if seed == 2 else 0)
        np.testing.assert_array_equal(got[seed], sampler.sample_images([(seed, 0)], settings).samples[0])


def test_a_non_finite_image_fails_alone_and_a_backend_error_fails_the_call():
    sampler = load(SHIPPED_MODEL, "onnxruntime", "cpu", "fp32")
    real = sampler.backend.denoise
    batch = StepBatch(sampler, 4)
    batch.add("ok", 1, 0, S(steps=3))
    level = batch.add("nan", 2, 0, S(steps=5)).plan.steps[1].cond

    def poisoned(x, cond):  # the 5-step image's second level is poisoned
        eps = real(x, cond)
        eps[np.asarray(cond, dtype=np.float64) == level] = np.nan
        return eps

    sampler.backend.denoise = poisoned
    first = batch.step()
    assert first == []
    (failed,) = batch.step()
    assert failed.lane.key == "nan" and failed.sample is None
    assert failed.error.startswith("non-finite values at sampling step 2/5 (noise variance")
    assert "float32" in failed.error  # the advice for the precision the network ran in
    (done,) = batch.step()
    assert done.lane.key == "ok" and done.error is None
    np.testing.assert_array_equal(done.sample, sampler.sample_images([(1, 0)], S(steps=3)).samples[0])

    def broken(x, cond):
        raise RuntimeError("device lost\nsecond line")

    sampler.backend.denoise = broken
    batch.add("a", 1, 0, S(steps=3))
    batch.add("b", 2, 0, S(steps=3))
    assert [(f.lane.key, f.error) for f in batch.step()] == [("a", "device lost"), ("b", "device lost")]
    assert len(batch) == 0
