"""What ``ddim-serve``'s starting process does with Ray besides deploying: reach the cluster or say why not, check
the resources the replicas ask for, watch the replicas' health for the front, and leave no process behind.

Ray-free at import (Ray is imported by the functions that need it), so the pieces are tested without a cluster.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from runtime.common.clitools import one_line
from runtime.serving.core import Answer
from runtime.serving.ingress import Unavailable
from runtime.serving.scaling import Autoscale

APP_NAME = "ddim"
DEPLOYMENT = "ddim"


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """``--address HOST:PORT``: reachable by TCP within ``timeout_s``, else one line (ray.init would retry for
    minutes, printing only its own warnings). ``auto``, ``local`` and ``ray://`` addresses are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address}: expected HOST:PORT of `ray start --head` (e.g. 10.0.0.5:6379), "
                         "or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ValueError(f"--address {address}: cannot reach a Ray cluster there "
                         f"({exc.strerror or one_line(exc)}); start one with `ray start --head` or fix the address"
                         ) from None


def shortfall(nodes: list[dict[str, float]], replicas: int, replica_cpus: float, replica_gpus: float,
              count_flag: str) -> list[str]:
    """What ``replicas`` replicas lack on these nodes (their resources: ``{"CPU": 2.0, ...}``): in total, and each
    on one node; [] when they fit. ``count_flag`` names where the count came from (``--replicas 3``)."""
    missing = []
    for name, each in (("CPU", replica_cpus), ("GPU", replica_gpus)):
        if each <= 0:
            continue
        total = sum(n.get(name, 0.0) for n in nodes)
        largest = max((n.get(name, 0.0) for n in nodes), default=0.0)
        flag = f"--replica-{name.lower()}s"
        if each > largest:
            missing.append(f"{flag} {each:g}: no node has {each:g} {name}s (the largest has {largest:g})")
        elif replicas * each > total:
            missing.append(f"{count_flag} x {flag} {each:g} = {replicas * each:g} {name}s, the cluster has "
                           f"{total:g}")
    return missing


def check_resources(replicas: int, replica_cpus: float, replica_gpus: float, joined: bool,
                    autoscale: Autoscale | None = None) -> list[str]:
    """The replicas must fit the cluster: in total, and each on one node. One line naming what is missing (Serve
    would wait for them forever, printing nothing). With ``autoscale``, MAX replicas must fit a local instance (it
    never grows); a joined cluster needs MIN now, and MAX not fitting is a warning (Ray's autoscaler may add
    nodes). Returns the warnings."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if autoscale is None:
        missing, warnings = shortfall(nodes, replicas, replica_cpus, replica_gpus, f"--replicas {replicas}"), []
    else:
        bounds = f"--autoscale {autoscale.label}"
        lo, hi = autoscale.min_replicas, autoscale.max_replicas
        at_max = shortfall(nodes, hi, replica_cpus, replica_gpus, f"{bounds}: MAX {hi}")
        missing = shortfall(nodes, lo, replica_cpus, replica_gpus, f"{bounds}: MIN {lo}") if joined else at_max
        warnings = [f"{bounds}: MAX replicas do not fit the cluster now ({'; '.join(at_max)}); Serve places the "
                    "ones that do not fit when nodes join"] if joined and at_max and not missing else []
    if missing:
        hint = "" if not joined else " (an autoscaling cluster may add nodes: lower the request or add them first)"
        raise ValueError(f"the replicas do not fit: {'; '.join(missing)}{hint}")
    return warnings


def deployment_status(app_name: str = APP_NAME) -> tuple[dict[str, int], str]:
    """(replicas by state: ``running``, ``starting`` (Serve's STARTING, UPDATING, RECOVERING), ``stopping``; why
    none runs: Ray's status and message) of this service's deployment."""
    from ray import serve

    states = {"running": 0, "starting": 0, "stopping": 0}
    status = serve.status()
    app = status.applications.get(app_name)
    if app is None:
        return states, "the application is not deployed"
    dep = app.deployments.get(DEPLOYMENT)
    if dep is None:
        return states, f"{app.status}: {one_line(Exception(app.message)) if app.message else 'no deployment'}"
    for state, count in dep.replica_states.items():
        name = str(getattr(state, "value", state)).rpartition(".")[2].upper()
        key = REPLICA_STATES.get(name)
        if key is not None:
            states[key] += count
    message = one_line(Exception(dep.message or app.message or "")) if (dep.message or app.message) else ""
    return states, f"{dep.status}{': ' + message if message else ''}"


REPLICA_STATES = {"RUNNING": "running", "STARTING": "starting", "UPDATING": "starting", "RECOVERING": "starting",
                  "STOPPING": "stopping", "PENDING_MIGRATION": "stopping"}


async def in_daemon_thread(fn: Any, timeout_s: float) -> Any:
    """``fn()`` in a daemon thread, awaited at most ``timeout_s`` (TimeoutError). Not the loop's default executor:
    a Ray call that never returns (its GCS gone) would hold that executor's shutdown, and so the exit, forever."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(), True
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting task)
            value, ok = exc, False
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, daemon=True, name="ddim-serve-ray-call").start()
    return await asyncio.wait_for(future, timeout_s)


class RayForwarder:
    """The front's way to the replicas: Serve's deployment handle, plus the health and the replicas by state that
    the watcher last saw (``states``: what ``GET /metrics`` and ``GET /v1/model`` show)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.why: str | None = None
        self.states: dict[str, int] = {}

    async def samples(self, fields: dict[str, Any]) -> Answer:
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.handle.samples.remote(fields)
        except BackPressureError:
            raise Unavailable("every replica's queue is full; retry later", 1) from None
        except (rex.RayActorError, rex.ActorUnavailableError) as exc:
            raise Unavailable(f"the replica stopped while sampling ({one_line(exc)[:160]}); retry", 1) from None

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    def health(self) -> str | None:
        return self.why

    def replicas(self) -> dict[str, int]:
        return dict(self.states)


# -- processes ---------------------------------------------------------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: processes our children leave behind (Ray's agents when its raylet or GCS dies) are re-parented to us,
    not to init, so :func:`end_descendants` finds them. False where the OS cannot."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int | None = None) -> list[int]:
    """PIDs below ``root`` (default: this process), from /proc; [] where there is no /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def end_descendants(grace_s: float = 5.0) -> int:
    """SIGTERM every descendant, SIGKILL what is left after ``grace_s``, reap; returns how many were running."""
    return end_processes(descendants(), grace_s)


def end_processes(pids: list[int], grace_s: float = 5.0) -> int:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace_s``, reap our children among them; returns how many."""
    count = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            _reap()
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break
            time.sleep(0.05)
        if not pids:
            break
    _reap()
    return count


def local_gcs_alive() -> bool:
    """Whether the GCS of the Ray instance we started still runs (without it ``ray.shutdown()`` waits a minute
    and Ray's core worker then aborts the process, cleaning nothing)."""
    for pid in descendants():
        try:
            if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid):
                return True
        except OSError:
            continue
    return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False
