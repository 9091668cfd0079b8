"""DDIM inversion (encode), decoding given latents, image-to-image: the runtime's loop and update run backwards and
from given starts. Checked against a float64 reference written here from the formulas, with an analytic denoiser
(Gaussian data, whose exact noise prediction is known), and bit for bit against ddim-run's own sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.api import Sampler, load
from runtime.config import KerasUNetConfig, ModelSpec, NormalizationConfig, ScheduleConfig
from runtime.noise import ImageNoise
from runtime.sampler import SamplingPlan
from runtime.schedule import build_schedule, select_steps
from runtime.settings import SamplingSettings, SettingsError
from runtime.common.shipped import SHIPPED_MODEL

MU, SD = 0.3, 0.5  # the analytic data: every pixel N(MU, SD^2) in model space


class Analytic:
    """The exact noise prediction for Gaussian data: E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) MU) / (a SD^2 + 1 - a)."""

    name, device, precision = "analytic", "cpu", "fp64"

    def __init__(self, schedule: ScheduleConfig, conditioning: str = "noise_variance") -> None:
        model = KerasUNetConfig(image_size=4, channels=1, widths=(8, 8), block_depth=1)
        if conditioning == "timestep":
            from runtime.config import DDPMUNetConfig
            model = DDPMUNetConfig(image_size=4, channels=1, base_width=32, channel_mults=(1,), num_res_blocks=1,
                                   attention_resolutions=(), conditioning="timestep")
        self.spec = ModelSpec(model, schedule, NormalizationConfig(mean=(0.5,), std=(0.5,)))
        self.schedule = build_schedule(schedule)
        self.conditioning = conditioning

    def alpha(self, cond: float) -> float:
        if self.conditioning == "timestep":
            return float(self.schedule.alpha_bar(np.array([int(cond)]))[0])
        return 1.0 - cond

    def denoise(self, x, cond):
        a = self.alpha(cond)
        return math.sqrt(1 - a) * (x.astype(np.float64) - math.sqrt(a) * MU) / (a * SD**2 + 1 - a)

    from_host = to_host = staticmethod(lambda a: a)
    is_finite = staticmethod(lambda a: bool(np.isfinite(a).all()))
    clip_bounds = staticmethod(lambda lo, hi: (lo[0], hi[0]))


def reference(x, levels, denoise):
    """DDIM's deterministic update (Eq. 12) in float64 between consecutive alpha_bar ``levels``; the network sees
    ``denoise(x, target level)`` going up (inversion) and ``denoise(x, current level)`` coming down."""
    x = x.astype(np.float64)
    for a_now, a_next in zip(levels, levels[1:]):
        a_eval = min(a_now, a_next)  # the noisier of the two: where the network is evaluated
        eps = denoise(x, a_eval)
        x0 = (x - math.sqrt(1 - a_now) * eps) / math.sqrt(a_now)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x


CASES = [(ScheduleConfig(), "noise_variance", "uniform"), (ScheduleConfig(), "noise_variance", "quadratic"),
         (ScheduleConfig(name="linear", num_timesteps=1000), "noise_variance", "trailing"),
         (ScheduleConfig(name="cosine", num_timesteps=1000), "timestep", "uniform")]


@pytest.mark.parametrize(("schedule", "conditioning", "spacing"), CASES)
def test_encode_and_decode_follow_the_float64_reference(schedule, conditioning, spacing):
    backend = Analytic(schedule, conditioning)
    sampler = Sampler(backend)  # type: ignore[arg-type]
    x0 = np.random.default_rng(0).normal(MU, SD, (3, 1, 4, 4)).astype(np.float32)
    errors = {}
    for steps in (10, 20, 50, 100):
        settings = SamplingSettings(steps, spacing=spacing)
        ts = select_steps(backend.schedule, steps, spacing)
        levels = [float(a) for a in backend.schedule.alpha_bar(ts)]  # noisiest first
        up = [1.0] + levels[::-1]  # inversion: from the clean image to the plan's first level
        if conditioning == "timestep":  # the network is given the step t of the level it is evaluated at
            denoise_at = lambda x, a: backend.denoise(x, float(ts[levels.index(a)]))  # noqa: E731
        else:
            denoise_at = lambda x, a: backend.denoise(x, 1.0 - a)  # noqa: E731
        ref_latents = reference(x0, up, denoise_at)
        latents = sampler.encode(x0, settings).samples
        np.testing.assert_allclose(latents, ref_latents, atol=1e-4)
        ref_back = reference(ref_latents, up[::-1], denoise_at)
        back = sampler.decode(latents, settings).samples
        np.testing.assert_allclose(back, ref_back, atol=1e-4)
        errors[steps] = float(np.mean((back.astype(np.float64) - x0) ** 2))
    # The reconstruction error falls as steps grow (the DDIM paper's Table 2).
    assert errors[10] > errors[20] > errors[50] > errors[100], errors
    assert errors[100] < 0.2 * errors[10], errors


def test_the_inverse_plan_walks_the_sampling_plan_backwards():
    schedule = build_schedule(ScheduleConfig(name="linear", num_timesteps=1000))
    plan = SamplingPlan.build(schedule, SamplingSettings(10), "timestep")
    inv = plan.inverse()
    assert [s.t for s in inv] == [s.t for s in plan][::-1] == list(range(0, 1000, 100))
    assert inv.steps[0].coef.a_t == 1.0 and inv.steps[-1].coef.a_prev == plan.steps[0].coef.a_t
    assert [s.cond for s in inv] == [s.cond for s in plan][::-1]  # the network sees the target level
    assert all(s.coef.sigma == 0 for s in inv)
    with pytest.raises(SettingsError, match="inversion is deterministic DDIM"):
        SamplingPlan.build(schedule, SamplingSettings(10, eta=0.5)).inverse()
    with pytest.raises(SettingsError, match="inversion is deterministic DDIM"):
        SamplingPlan.build(schedule, SamplingSettings(10, solver="dpmpp-2m")).inverse()


@pytest.fixture(scope="module")
def shipped():
    return load(SHIPPED_MODEL, "onnxruntime", "cpu", "fp32", threads=1)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_decoding_the_drawn_noise_is_sampling_bit_for_bit(shipped, eta):
    m = shipped.spec.model
    x_T = ImageNoise(7, range(5)).draw((m.channels, m.image_size, m.image_size))
    settings = SamplingSettings(6, eta=eta)
    ref = shipped.sample(5, settings, seed=7, batch_size=2)
    got = shipped.decode(x_T, settings, seed=7, batch_size=3)
    np.testing.assert_array_equal(got.samples, ref.samples)
    np.testing.assert_array_equal(got.images, ref.images)


def test_reconstruction_and_image_to_image_on_the_shipped_model(shipped):
    images = shipped.sample(4, steps=50, seed=1)  # images the model can make: inversion should find them again
    errors = {}
    for steps in (10, 50):
        latents = shipped.encode(images.samples, steps=steps).samples
        assert latents.shape == images.samples.shape and np.isfinite(latents).all()
        back = shipped.decode(latents, steps=steps)
        errors[steps] = float(np.abs(back.images.astype(int) - images.images).mean())  # grey levels
    # Measured 22.8 and 8.7 grey levels (5.1 at 100 steps): falling with steps, as in the DDIM paper.
    assert errors[50] < errors[10] and errors[50] < 15, errors
    x0 = images.samples
    near = shipped.image_to_image(x0, 0.3, steps=20, seed=2)
    far = shipped.image_to_image(x0, 1.0, steps=20, seed=2)
    assert near.steps == 6 and far.steps == 20
    assert np.mean((near.samples - x0) ** 2) < np.mean((far.samples - x0) ** 2)
    again = shipped.image_to_image(x0, 0.3, steps=20, seed=2, batch_size=1)
    np.testing.assert_array_equal(again.images, near.images)  # (seed, index) noise: batch-independent


@pytest.mark.parametrize(("call", "pattern"), [
    (lambda s, x: s.image_to_image(x, 0.0, steps=10), r"strength must be in \(0, 1\], got 0.0"),
    (lambda s, x: s.image_to_image(x, 1.5, steps=10), r"strength must be in \(0, 1\], got 1.5"),
    (lambda s, x: s.image_to_image(x, 0.05, steps=10), "strength 0.05 of 10 steps runs no step"),
    (lambda s, x: s.encode(x[:, :, :8], steps=10), r"images of shape \(2, 1, 8, 32\): this model takes \(N, 1, 32, 32\)"),
    (lambda s, x: s.decode(np.where(x > 0, np.nan, x), steps=10), "latents hold NaN or Inf"),
    (lambda s, x: s.decode(x[:0], steps=10), "latents of shape"),
    (lambda s, x: s.encode(x, steps=10, eta=0.5), "inversion is deterministic DDIM"),
])
def test_bad_input_is_one_line(shipped, call, pattern):
    x = np.zeros((2, 1, 32, 32), np.float32) + 0.1
    with pytest.raises(ValueError, match=pattern) as caught:
        call(shipped, x)
    assert "\n" not in str(caught.value)
