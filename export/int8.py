"""INT8 ONNX for CPU deployment: static QDQ quantization calibrated across the whole noise schedule.

A diffusion denoiser sees very different activations at different noise levels (Q-Diffusion,
PTQ4DM), so the calibration set spans the schedule:

- ``data``: real training images, noised at variances stratified over the training distribution of
  steps (uniform t, as the trainer draws them): ``x_t = sqrt(1 - v) x0 + sqrt(v) eps``;
- ``sampler``: the inputs the float32 ONNX model itself sees along 50-step DDIM trajectories
  (every step of every image, from pure noise to the last step).

The default mixes both, half and half (``calibration_size`` pairs in all, seeded). Weights are
quantized per output channel (symmetric, 7 bits by default: ``reduce_range``), activations per
tensor (uint8, asymmetric),
with ONNX Runtime's quantization tools in QDQ format; ONNX Runtime's CPU provider fuses the
pairs into integer convolutions. Kept in float32: the noise-variance embedding (its angles
reach 2*pi*1000*variance), the first convolution (it reads the raw noisy image) and the last one
(its output is the predicted noise itself); measurements behind these choices are in docs/export.md.

Why 7-bit weights: on x86 CPUs without VNNI (AVX2 only, like this project's machine) ONNX Runtime's
u8 x s8 kernels add pairs of products in saturating int16 (``vpmaddubsw``); 255 x 127 x 2 overflows
it. With 7-bit weights it cannot: measured on the shipped model, FD-classifier 1.22x float32's
with 8-bit weights, 0.96x with 7-bit, at the same speed (``benchmarks/int8_tradeoff.py``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import onnx
from numpy.typing import NDArray

from export.io_spec import feed
from export.onnx_graph import embedding_nodes
from runtime.config import ModelSpec
from runtime.schedule import build_schedule, noise_variance

log = logging.getLogger(__name__)

Calibration = Literal["data", "sampler", "both"]
Method = Literal["minmax", "percentile", "entropy"]
KeepFloat = Literal["embedding", "first-conv", "last-conv"]
KEEP_FLOAT: tuple[KeepFloat, ...] = ("embedding", "first-conv", "last-conv")
GATE_BATCH = 32  # images per sampling batch in the quality gate


@dataclass(frozen=True)
class Int8Options:
    """How ``model.int8.onnx`` is calibrated and what stays in float32."""

    calibration: Calibration = "both"
    """Calibration inputs: training images noised across the schedule (data), the float32 model's own
    DDIM trajectories (sampler), or half of each."""
    calibration_size: int = 512
    """Calibration (image, noise variance) pairs."""
    calibration_steps: int = 50
    """DDIM steps of the sampler trajectories."""
    method: Method = "minmax"
    """How activation ranges are chosen from the calibration set."""
    keep_float: tuple[KeepFloat, ...] = KEEP_FLOAT
    """Parts left in float32, comma-separated, or none."""
    op_types: tuple[str, ...] | None = None
    """ONNX op types to quantize, comma-separated; none: every one ONNX Runtime can."""
    reduce_range: bool = True
    """7-bit weights (no int16 saturation in AVX2, non-VNNI u8 x s8 kernels); off: the full 8 bits."""
    seed: int = 0
    """Seed of the calibration set."""
    batch: int = 16
    """Calibration batch."""

    def __post_init__(self) -> None:
        for name, low in (("calibration_size", 8), ("calibration_steps", 1), ("batch", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for part in self.keep_float:
            if part not in KEEP_FLOAT:
                raise ValueError(f"unknown keep_float part {part!r}; allowed: {', '.join(KEEP_FLOAT)}")


@dataclass
class Int8Report:
    seconds: float = 0.0
    calibration: str = ""
    kept_float32: list[str] = field(default_factory=list)
    quantized_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes reading dequantized tensors


def stratified_steps(spec: ModelSpec, n: int, rng: np.random.Generator) -> NDArray:
    """``n`` steps covering the training distribution of steps (uniform t), stratified, shuffled."""
    schedule = build_schedule(spec.schedule)
    u = (np.arange(n) + rng.random(n)) / n
    if schedule.discrete:
        assert schedule.num_timesteps is not None  # noqa: S101 (discrete schedules have T)
        t: NDArray = np.minimum((u * schedule.num_timesteps).astype(np.int64), schedule.num_timesteps - 1)
    else:
        t = u
    return rng.permutation(t)


Pair = tuple[NDArray[np.float32], float, float]  # one image x_t (C, H, W), its noise variance and its step


def data_pairs(spec: ModelSpec, images: NDArray[np.uint8], n: int, rng: np.random.Generator) -> Iterator[Pair]:
    """(x_t, variance, step) for ``n`` training images (N, C, H, W uint8) noised across the schedule."""
    pick = images[rng.choice(len(images), n, replace=n > len(images))]
    mean = np.asarray(spec.normalization.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.normalization.std, np.float32).reshape(1, -1, 1, 1)
    x0 = (pick.astype(np.float32) / 255.0 - mean) / std
    t = stratified_steps(spec, n, rng)
    v = noise_variance(build_schedule(spec.schedule), t).astype(np.float32)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = np.sqrt(1.0 - v.reshape(-1, 1, 1, 1)) * x0 + np.sqrt(v.reshape(-1, 1, 1, 1)) * eps
    for i in range(n):
        yield x_t[i], float(v[i]), float(t[i])


def sampler_pairs(fp32_model: Path, spec: ModelSpec, n: int, steps: int, seed: int) -> Iterator[Pair]:
    """(x_t, variance, step) the float32 model sees along DDIM trajectories: ``n`` pairs from the whole run."""
    from runtime.api import Sampler
    from runtime.backends.ort_backend import OrtBackend
    from runtime.settings import SamplingSettings

    backend = OrtBackend(fp32_model, "cpu")
    sampler = Sampler(backend)
    by_cond = {s.cond: s for s in sampler.plan(SamplingSettings(steps))}  # the plan's steps, by what the network is given
    seen: list[tuple[NDArray[np.float32], float]] = []
    inner = backend.denoise

    def recording(x: NDArray[np.float32], cond: float) -> NDArray[np.float32]:
        seen.append((x.copy(), cond))
        return inner(x, cond)

    backend.denoise = recording  # type: ignore[method-assign]
    images = max(1, -(-n // steps))  # enough trajectories for n pairs, one pair per image and step
    sampler.sample(images, SamplingSettings(steps), seed=seed + 1, batch_size=min(images, 32))
    pairs = [(x[i], by_cond[c].noise_var, by_cond[c].t) for x, c in seen for i in range(len(x))]
    rng = np.random.default_rng(seed + 2)
    for j in rng.permutation(len(pairs))[:n]:
        yield pairs[j]


def calibration_batches(fp32_model: Path, spec: ModelSpec, images: Callable[[], NDArray[np.uint8]] | None,
                        opts: Int8Options) -> list[dict[str, NDArray[np.float32]]]:
    """The calibration set as ONNX Runtime feeds: ``calibration_size`` pairs in batches of ``batch``
    (``images`` None: no training data, e.g. an imported diffusers model; only ``sampler`` calibrates)."""
    if images is None and opts.calibration != "sampler":
        raise ValueError(f"INT8 calibration {opts.calibration!r} needs training images; this model has none: "
                         "use sampler")
    rng = np.random.default_rng(opts.seed)
    n_sampler = {"data": 0, "sampler": opts.calibration_size, "both": opts.calibration_size // 2}[opts.calibration]
    n_data = opts.calibration_size - n_sampler
    pairs = list(data_pairs(spec, images(), n_data, rng)) if n_data and images is not None else []
    if n_sampler:
        pairs += list(sampler_pairs(fp32_model, spec, n_sampler, opts.calibration_steps, opts.seed))
    order = rng.permutation(len(pairs))
    feeds = []
    for start in range(0, len(order), opts.batch):
        chunk = [pairs[j] for j in order[start : start + opts.batch]]
        feeds.append(feed(spec.model, np.stack([c[0] for c in chunk]), np.array([c[1] for c in chunk]),
                          np.array([c[2] for c in chunk])))
    return feeds


def float_nodes(graph: onnx.GraphProto, keep: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Node names to leave in float32, and a description of them for the report."""
    unknown = set(keep) - set(KEEP_FLOAT)
    if unknown:
        raise ValueError(f"cannot keep {', '.join(sorted(unknown))} in float32; allowed: {', '.join(KEEP_FLOAT)}")
    names, what = [], []
    if "embedding" in keep:
        embed = embedding_nodes(graph)
        names += embed
        what.append(f"embedding path ({len(embed)} nodes: "
                    f"{', '.join(sorted({n.op_type for n in graph.node if n.name in set(embed)}))})")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if "first-conv" in keep and convs:
        names.append(convs[0].name)
        what.append(f"first convolution ({convs[0].name})")
    if "last-conv" in keep and convs:
        names.append(convs[-1].name)
        what.append(f"last convolution ({convs[-1].name})")
    return names, what


def quantize_int8(fp32_model: Path, out: Path, spec: ModelSpec, images: Callable[[], NDArray[np.uint8]] | None,
                  opts: Int8Options = Int8Options()) -> Int8Report:
    """Write ``out`` (QDQ INT8) from the float32 ONNX file ``fp32_model``; metadata is the caller's."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    feeds = calibration_batches(fp32_model, spec, images, opts)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[opts.method]
    with tempfile.TemporaryDirectory(prefix=".int8-pre-", dir=out.parent) as tmp:
        # The quantizer asks for its pre-processing (ONNX Runtime's basic graph optimisations and shape
        # inference), twice per call, until the model carries its tag. On our graphs it changes nothing the
        # quantizer writes (identical QDQ graphs and weights for both U-Nets and the shipped model, measured)
        # and costs well under a second. Symbolic shape inference is skipped: it stops with "Incomplete
        # symbolic shape inference" on these graphs, and ONNX's own shape inference covers convolution nets.
        pre = Path(tmp) / "model.pre.onnx"
        quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True)
        exclude, kept = float_nodes(onnx.load(str(pre)).graph, opts.keep_float)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=opts.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        op_types_to_quantize=list(opts.op_types) if opts.op_types else None,
                        calibrate_method=method)
    quantized = onnx.load(str(out))
    dq_out = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = Counter(n.op_type for n in quantized.graph.node
                     if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input))
    pairs = sum(len(f["noisy_images"]) for f in feeds)
    calibration = f"{pairs} pairs ({opts.calibration}), seed {opts.seed}, {opts.method}"
    return Int8Report(time.perf_counter() - start, calibration, kept, dict(counts))


@dataclass(frozen=True)
class GateOptions:
    """The INT8 quality gate: same-noise samples of the float32 and INT8 files, scored."""

    images: int = 256
    """Same-noise samples the gate compares."""
    steps: int = 50
    """DDIM steps of those samples."""
    min_psnr_db: float = 20.0
    """Least same-noise PSNR (dB) of INT8 samples against float32 ONNX ones."""
    max_fd_ratio: float = 1.5
    """Largest FD-classifier of INT8 samples over float32's, both against training images
    (Fashion-MNIST-shaped models)."""
    reference_images: int = 10_000
    """Training images the FD-classifier compares with."""
    classifier: str | None = None
    """Classifier folder of the FD-classifier (python -m quality classifier); none: the shipped one."""

    def __post_init__(self) -> None:
        for name, low in (("images", 2), ("steps", 1), ("reference_images", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not (self.min_psnr_db >= 0 or self.min_psnr_db == -math.inf):  # -inf: no PSNR check (benchmarks)
            raise ValueError(f"min_psnr_db must be >= 0, got {self.min_psnr_db}")
        if not self.max_fd_ratio > 0:
            raise ValueError(f"max_fd_ratio must be > 0, got {self.max_fd_ratio}")


@dataclass
class GateResult:
    n: int
    steps: int
    psnr_db: float
    max_abs_diff: int
    fd_fp32: float | None = None
    fd_int8: float | None = None
    fd_note: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def fd_ratio(self) -> float | None:
        return None if self.fd_fp32 is None or self.fd_int8 is None else self.fd_int8 / self.fd_fp32

    def line(self) -> str:
        fd = (f", FD-classifier {self.fd_int8:.3f} vs float32 {self.fd_fp32:.3f} ({self.fd_ratio:.3f}x)"
              if self.fd_ratio is not None else f" ({self.fd_note})" if self.fd_note else "")
        return (f"INT8 quality gate on {self.n} images x {self.steps} steps: same-noise PSNR {self.psnr_db:.1f} dB "
                f"(max pixel difference {self.max_abs_diff}){fd}: {'passed' if self.passed else 'FAILED'}")


def quality_gate(fp32_model: Path, int8_model: Path, spec: ModelSpec,
                 images: Callable[[], NDArray[np.uint8]] | None, opts: GateOptions = GateOptions(),
                 progress: bool = True) -> GateResult:
    """Sample the same noise through both files; PSNR always, FD-classifier for Fashion-MNIST-shaped models
    with training images (``images`` None: none, e.g. an imported diffusers model).

    ``progress``: a progress bar on stderr over the sampling steps of both files (a minute or more at the
    default 256 images).
    """
    from runtime.backends.ort_backend import OrtBackend

    return SameNoiseGate(fp32_model, spec, images, opts, progress).check(lambda: OrtBackend(int8_model, "cpu"))


class SameNoiseGate:
    """The INT8 quality gate's measurement, for any candidate backend: its same-noise samples (seed 0, ``opts``'
    images and steps) against those of ``fp32_model`` on ONNX Runtime CPU, scored and thresholded by ``opts``.
    The float32 samples and the FD-classifier's reference statistics are made once and kept, so one object
    gates several candidates (``export.engine_gates``: OpenVINO int8 and bf16 after ONNX Runtime INT8)."""

    def __init__(self, fp32_model: Path, spec: ModelSpec, images: Callable[[], NDArray[np.uint8]] | None,
                 opts: GateOptions = GateOptions(), progress: bool = True) -> None:
        self.fp32_model, self.spec, self.images, self.opts, self.progress = fp32_model, spec, images, opts, progress
        self._reference: NDArray[np.uint8] | None = None
        self._fd: tuple[Any, Any, float] | None = None  # extractor, reference stats, FD of the float32 samples
        self._fd_note = ""

    def check(self, open_candidate: Callable[[], Any], desc: str = "INT8 quality gate",
              label: str = "int8") -> GateResult:
        """Gate the backend ``open_candidate()`` makes (opened after the float32 samples exist); ``desc`` and
        ``label`` name the progress bar and the candidate's part of it. ``fd_int8`` of the result is the
        candidate's FD-classifier, whatever its precision."""
        from runtime.backends.ort_backend import OrtBackend
        from runtime.common.progress import progress_bar
        from quality import max_abs_diff, psnr

        opts = self.opts
        batches = -(-opts.images // GATE_BATCH)
        runs = 1 if self._reference is not None else 2
        with progress_bar(total=runs * batches * opts.steps, desc=desc, unit="step",
                          disable=not self.progress) as bar:
            if self._reference is None:
                bar.set_postfix_str("float32")
                self._reference = self._sample(OrtBackend(self.fp32_model, "cpu"), bar)
            bar.set_postfix_str(label)
            candidate = self._sample(open_candidate(), bar)
        reference = self._reference
        result = GateResult(opts.images, opts.steps, psnr(candidate, reference), max_abs_diff(candidate, reference))
        self._score_fd(candidate, result)
        if result.psnr_db < opts.min_psnr_db:
            result.failures.append(f"same-noise PSNR {result.psnr_db:.1f} dB < {opts.min_psnr_db:g} dB")
        if result.fd_ratio is not None and result.fd_ratio > opts.max_fd_ratio:
            result.failures.append(f"FD-classifier {result.fd_ratio:.2f}x the float32 model's > {opts.max_fd_ratio:g}x")
        return result

    def _sample(self, backend: Any, bar: Any) -> NDArray[np.uint8]:
        from runtime.api import Sampler
        from runtime.settings import SamplingSettings

        return Sampler(backend).sample(self.opts.images, SamplingSettings(self.opts.steps), seed=0,
                                       batch_size=GATE_BATCH, on_step=lambda i: bar.update(1)).images

    def _score_fd(self, candidate: NDArray[np.uint8], result: GateResult) -> None:
        """FD-classifier of the float32 and the candidate samples against training images, where it applies."""
        from quality import ClassifierFeatures, feature_stats, frechet_distance, reference_stats

        opts, m = self.opts, self.spec.model
        if self._fd is None and not self._fd_note:
            if (m.image_size, m.channels) != (32, 1):
                self._fd_note = "FD-classifier only for 32x32 grey (Fashion-MNIST) models"
            elif self.images is None:
                self._fd_note = "no FD-classifier: no training images to compare with"
            else:
                try:
                    ext = ClassifierFeatures(Path(opts.classifier) if opts.classifier is not None else None)
                except ValueError as exc:
                    if opts.classifier is not None:  # asked for by name: never skipped silently
                        raise
                    self._fd_note = f"no FD-classifier: {exc}"
                else:
                    ref_stats = reference_stats(ext, self.images(), opts.reference_images)
                    assert self._reference is not None  # noqa: S101 (sampled before any candidate)
                    self._fd = (ext, ref_stats, frechet_distance(feature_stats(ext.features(self._reference)),
                                                                 ref_stats))
        if self._fd is None:
            result.fd_note = self._fd_note
            return
        ext, ref_stats, result.fd_fp32 = self._fd
        result.fd_int8 = frechet_distance(feature_stats(ext.features(candidate)), ref_stats)
