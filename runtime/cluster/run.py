"""``ddim-run --cluster``: sample the shards of a run as Ray tasks, keep them (:mod:`runtime.cluster.shards`), merge.

Ray tasks, not actors or Ray Data: a shard is a pure function of (model, engine, settings, seed, index range), so a
stateless task is the whole job; Ray retries a task whose worker died (``max_retries``: a killed process, a lost
node) and never retries one that raised (a missing model stays an error); and nothing beyond Ray core is needed (no
dataset layer, no pipeline). Each task runs the lean runtime (``runtime.api.load``; a worker process keeps its model
loaded for the next shard) with ``--threads`` threads, default the CPUs Ray gave it (``--worker-cpus``).

The driver (this process) loads the model first (a wrong path fails before Ray starts) and fixes the engine and
precision it picked, so every worker runs the same file on the same engine; workers check the model's sha256. It
writes each shard as it arrives, so a killed run keeps what it finished. A local instance is started and ended as
``ddim-serve`` starts and ends its own (:mod:`runtime.serving.cluster`: address check, leftover processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from runtime.cluster.shards import MemoryShards, Shard, ShardData, ShardFolder, ShardStore, merge, split
from runtime.common.clitools import one_line
from runtime.settings import SamplingSettings

log = logging.getLogger("runtime")
MAX_RETRIES = 3  # a shard's worker may die this often (Ray starts another each time) before the run fails
SHUTDOWN_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ClusterOptions:
    """How ``ddim-run --cluster`` spreads the run: where, in which pieces, how many at once, with what each."""

    address: str  # "local" (start one here), "auto" or HOST:PORT of `ray start --head`
    shard_size: int = 64
    workers: int | None = None  # most shards in flight [default: as many as the cluster's CPUs take]
    worker_cpus: float = 1.0  # Ray's num_cpus of each task
    threads: int | None = None  # per worker [default: its CPUs from Ray]
    batch_size: int = 16
    out_dir: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class ShardJob:
    """What one task samples, and with exactly which model and engine (fixed by the driver)."""

    model: str
    model_sha256: str
    backend: str
    device: str
    precision: str | None
    threads: int | None
    settings: SamplingSettings
    seed: int
    shard: Shard
    batch_size: int


@dataclass
class ShardOutput:
    """A task's answer: the shard's arrays, its sampling time and the worker (``HOST:PID``) that made it."""

    data: ShardData
    seconds: float
    worker: str


@dataclass
class ClusterResult:
    """The merged run and what it took."""

    data: ShardData
    seconds: float  # from the first task submitted to the last shard written
    sampled: int  # images sampled by this run (the rest were resumed from --out-dir)
    shards: int
    nodes: int


_SAMPLERS: dict[tuple[Any, ...], Any] = {}  # per worker process: the model stays loaded between its shards


def worker_threads() -> int:
    """The CPUs Ray gave this task (at least 1): the default threads of a worker."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 (outside a Ray task: one thread)
        cpus = 1.0
    return max(1, int(cpus))


def sample_shard(job: ShardJob) -> ShardOutput:
    """Sample one shard (runs in a Ray worker; plain Python, so it also runs without Ray)."""
    from runtime.api import load
    from runtime.latents import model_identity

    host = f"{socket.gethostname()}:{os.getpid()}"
    threads = job.threads or worker_threads()
    key = (job.model, job.model_sha256, job.backend, job.device, job.precision, threads)
    if key not in _SAMPLERS:
        if not os.path.exists(job.model):
            raise ValueError(f"{job.model} does not exist on {socket.gethostname()}: every node needs the model at "
                             "the same path")
        found = model_identity(Path(job.model))
        if found != job.model_sha256:
            raise ValueError(f"{job.model} on {socket.gethostname()} is another model (sha256 {found[:12]}..., the "
                             f"driver's {job.model_sha256[:12]}...): every node needs the same model file")
        _SAMPLERS.clear()
        _SAMPLERS[key] = load(job.model, job.backend, job.device, job.precision, threads)  # type: ignore[arg-type]
    sampler = _SAMPLERS[key]
    s = job.shard
    result = sampler.sample_images([(job.seed, i) for i in range(s.first, s.first + s.count)], job.settings,
                                   batch_size=job.batch_size)
    return ShardOutput(ShardData(result.samples, result.images), result.seconds, host)


def import_ray() -> Any:
    """Ray, and the serving stack's Ray helpers this command shares (both come with the ``serve`` extra); one line
    naming the install command when missing."""
    from runtime.common.extras import install_hint

    try:
        import ray

        from runtime.serving import cluster  # noqa: F401 (check_address, end_descendants)
    except ImportError:
        raise RuntimeError(f"ddim-run --cluster needs Ray: {install_hint('serve')}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Ray, connected to ``address`` for the block: ``local`` starts an instance here (quiet, no dashboard) and ends
    it at exit with every process below this one (a command line's: ddim-run has no others), as ddim-serve does; HOST:PORT is checked by TCP first (one line, not
    minutes of retries) and only disconnected at exit. A Ray this process already runs (a caller's: a notebook, a
    test) is used as it is and left running."""
    ray = import_ray()
    from runtime.serving import cluster
    from runtime.serving.process import quiet_ray_logs, serve_environment

    try:
        cluster.check_address(address)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--address", "--cluster", 1).replace(", or auto", ", local or auto")) \
            from None
    if ray.is_initialized():
        yield ray
        return
    local = address == "local"
    quiet_ray_logs()
    serve_environment()
    if local:
        cluster.become_subreaper()  # Ray's orphans come back to us, so end_descendants finds them
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
        except ConnectionError as exc:
            raise ConnectionError(f"--cluster {address}: {one_line(exc)}{_auth_hint(local)}") from None
        if main:  # Ray's core worker installs a handler that dies without cleaning up: stop as Ctrl-C does
            signal.signal(signal.SIGTERM, _interrupt)
        yield ray
    finally:
        _disconnect(ray, local)
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _auth_hint(local: bool) -> str:
    """Why joining may fail: Ray 2.60's `ray start --head` takes only clients with its token, and a client given an
    explicit address sends it only when told to."""
    if local or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; a cluster of `ray start --head` takes only clients with its token: set RAY_AUTH_MODE=token and give "
            "this machine the head's ~/.ray/auth_token (or RAY_AUTH_TOKEN)")


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _disconnect(ray: Any, local: bool) -> None:
    """Leave Ray within a bounded time; a local instance ends whole, with every process it left below us."""
    from runtime.serving import cluster

    if ray.is_initialized() and (not local or cluster.local_gcs_alive()):  # a dead GCS: shutdown would wait a minute
        worker = threading.Thread(target=ray.shutdown, daemon=True)
        worker.start()
        worker.join(SHUTDOWN_TIMEOUT_S)
        if worker.is_alive():
            log.warning("cluster: Ray did not shut down within %g s; ending its processes", SHUTDOWN_TIMEOUT_S)
    if local:
        left = cluster.end_descendants()
        if left:
            log.info("cluster: ended %d process(es) the local Ray instance left", left)


def _nodes(ray: Any, worker_cpus: float) -> tuple[int, float]:
    """(alive nodes, CPUs) of the cluster; ValueError when no node can take one worker (Ray would wait forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if worker_cpus > largest:
        raise ValueError(f"--worker-cpus {worker_cpus:g}: no node of the cluster has that many CPUs (the largest has "
                         f"{largest:g})")
    return len(nodes), sum(n.get("CPU", 0.0) for n in nodes)


def sample_on_cluster(sampler: Any, model: Path, settings: SamplingSettings, seed: int, total: int,
                      o: ClusterOptions) -> ClusterResult:
    """Images ``(seed, 0) .. (seed, total - 1)`` sampled in shards on Ray with ``sampler``'s model, engine and
    precision (``settings`` resolved), merged in index order; shards done earlier in ``o.out_dir`` are kept."""
    from runtime.common.progress import progress_bar
    from runtime.latents import model_identity

    b = sampler.backend
    precision = getattr(b, "precision", None)
    identity = {"model_sha256": model_identity(model), "engine": {"backend": b.name, "precision": precision,
                                                                  "device": b.device},
                "settings": settings.to_dict(), "seed": seed, "total": total, "shard_size": o.shard_size,
                "image_shape": list(sampler.image_shape)}
    shards = split(total, o.shard_size)
    store_cm: Any = ShardFolder(o.out_dir, identity, shards, model=str(model)) if o.out_dir is not None \
        else contextlib.nullcontext(MemoryShards())
    with store_cm as store:
        for why in getattr(store, "redo", []):
            log.warning("cluster: redoing %s", why)
        todo = [s for s in shards if s.index not in store.done]
        jobs = [ShardJob(str(Path(model).resolve()), identity["model_sha256"], b.name, b.device, precision,
                         o.threads, settings, seed, s, o.batch_size) for s in todo]
        with ray_session(o.address) as ray:
            nodes, cpus = _nodes(ray, o.worker_cpus)
            kept = f", {len(shards) - len(todo)} done earlier in {o.out_dir} (verified)" if len(todo) < len(shards) \
                else ""
            log.info("cluster: %s, %d node(s), %g CPUs; %d shard(s) of up to %d images%s; %s at a time, %g CPU(s) "
                     "and %s thread(s) each", "a local Ray instance" if o.address == "local" else o.address, nodes,
                     cpus, len(shards), o.shard_size, kept, o.workers or "as many as fit", o.worker_cpus,
                     o.threads or "as many")
            start = time.perf_counter()
            done = sum(s.count for s in shards if s.index in store.done)
            with progress_bar(total=total, initial=done, desc="sampling", unit="image",
                              disable=not o.progress) as bar:
                _run_shards(ray, jobs, store, o, lambda n: bar.update(n))
            seconds = time.perf_counter() - start
        data = merge(store, shards)
    return ClusterResult(data, seconds, sum(s.count for s in todo), len(shards), nodes)


def _run_shards(ray: Any, jobs: list[ShardJob], store: ShardStore, o: ClusterOptions, tick: Any) -> None:
    """Every job as a Ray task (at most ``o.workers`` in flight), each shard kept as it arrives."""
    if not jobs:
        return
    remote = ray.remote(sample_shard).options(num_cpus=o.worker_cpus, max_retries=MAX_RETRIES, name="sample_shard")
    queue, pending = list(jobs), {}
    cap = o.workers or len(jobs)
    try:
        while queue or pending:
            while queue and len(pending) < cap:
                job = queue.pop(0)
                pending[remote.remote(job)] = job
            [ready], _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            out = _answer(ray, ready, job, o)
            store.put(job.shard, out.data, out.worker)
            tick(job.shard.count)
    finally:
        for ref in pending:  # an error or Ctrl-C: what is done is kept, the rest need not run on
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _answer(ray: Any, ref: Any, job: ShardJob, o: ClusterOptions) -> ShardOutput:
    """The task's output, or its error as one line naming the shard (the runtime's own errors as they are)."""
    from ray import exceptions as rex

    from runtime.sampler import NonFiniteError

    resume = f"; the shards done are kept in {o.out_dir}: the same command resumes" if o.out_dir else ""
    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, NonFiniteError):
            raise cause from None
        raise RuntimeError(f"{job.shard.describe()}: {one_line(cause)}{resume}") from None
    except rex.RayError as exc:  # its worker died more often than max_retries, or its node went away
        raise RuntimeError(f"{job.shard.describe()}: its worker died {MAX_RETRIES + 1} times "
                           f"({one_line(exc)[:160]}){resume}") from None
