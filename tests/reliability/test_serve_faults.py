"""ddim-serve's command line under faults, as a user or an orchestrator meets them: no hang is silent, every one
ends within its timeout with one line and a non-zero exit, and no Ray process outlives the service.

The fast cases need no Ray; the others start the real service (a local Ray instance, ~15 s each) and are slow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runtime.common.shipped import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[2]


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.serving.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> set[int]:
    """PIDs of Ray's processes on this machine (gcs_server, raylet, ray::* workers and agents)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = stat.read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmd.startswith((b"ray::", b"/")) and (b"gcs_server" in cmd or b"/raylet " in cmd or cmd.startswith(b"ray::")
                                                 or b"dashboard/agent.py" in cmd or b"runtime_env/agent" in cmd):
            out.add(int(stat.parent.name))
    return out


class Service:
    """ddim-serve in its own session, its stderr collected; ``url`` once ready."""

    def __init__(self, *args: str, ignore_sigint: bool = False) -> None:
        self.port = free_port()
        self.before = ray_processes()

        def child() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)

        self.proc = subprocess.Popen(serve_cmd(*args, "--port", str(self.port), "--threads", "1", "--max-batch",
                                               "4"),
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, preexec_fn=child)
        self.err: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self, timeout: float = 150) -> None:
        line: list[str] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        assert line and line[0].strip() == self.url, (line, self.proc.poll(), "".join(self.err)[-2000:])

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"no exit within {timeout} s; stderr: {''.join(self.err)[-2000:]}")
        self.reader.join(10)
        return rc

    def stderr(self) -> str:
        return "".join(self.err)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def leftovers(self) -> set[int]:
        """Ray processes started since this service started that are still alive (a few seconds' grace)."""
        deadline = time.monotonic() + 10
        while (left := ray_processes() - self.before) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


def request(url: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_an_unreachable_cluster_is_one_line_at_once():
    start = time.monotonic()
    run = subprocess.run(serve_cmd(str(SHIPPED_MODEL), "--address", "127.0.0.1:1"), cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == ("error: --address 127.0.0.1:1: cannot reach a Ray cluster there "
                                                   "(Connection refused); start one with `ray start --head` or fix "
                                                   "the address")
    assert time.monotonic() - start < 30 and "Traceback" not in run.stderr


@pytest.mark.slow
def test_replicas_that_cannot_fit_are_one_line_and_leave_nothing():
    svc = Service(str(SHIPPED_MODEL), "--replicas", "3", "--replica-cpus", str(os.cpu_count() or 2),
                  "--ready-timeout", "60")
    try:
        rc = svc.wait(90)
        err = svc.stderr()
        assert rc == 1 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error: the replicas do not fit: --replicas 3 x --replica-cpus")
        assert not svc.leftovers()
    finally:
        svc.close()


def alive(procs: dict[int, bytes]) -> dict[int, bytes]:
    """Those of ``procs`` (pid -> cmdline) still running as themselves (not a zombie, not a reused pid)."""
    from runtime.serving.cluster import _alive

    left = {}
    for pid, cmd in procs.items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmd and _alive(pid):
                left[pid] = cmd
        except OSError:
            continue
    return left


@pytest.mark.slow
def test_sigint_inherited_as_ignored_drains_and_exits_0_leaving_no_process():
    """A background job of a script inherits SIGINT ignored: ddim-serve still drains on it, exits 0 within the
    grace period (30 s, nothing in flight) and no process that was below it (Ray's) outlives it."""
    from runtime.serving.cluster import descendants

    svc = Service(str(SHIPPED_MODEL), "--replica-cpus", "0.5", ignore_sigint=True)
    try:
        svc.ready()
        assert request(svc.url, "/healthz")[0] == 200
        assert request(svc.url, "/v1/samples", {"num_images": 1, "steps": 2})[0] == 200
        below = {}
        for pid in descendants(svc.proc.pid):
            try:
                below[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
        assert any(cmd.startswith(b"ray::") for cmd in below.values()), below  # Ray runs below it
        os.kill(svc.proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        rc = svc.wait(90)
        took = time.monotonic() - t0
        err = svc.stderr()
        assert rc == 0 and took < 30, (rc, took, err[-2000:])
        assert "ddim-serve: SIGINT: draining" in err and err.rstrip().endswith("ddim-serve: stopped")
        assert "Traceback" not in err
        assert not alive(below), alive(below)
    finally:
        svc.close()


@pytest.mark.slow
def test_a_dead_gcs_leaves_no_process():
    """Ray's GCS killed under it: the service still stops within its bounds and ends the agents Ray left."""
    svc = Service(str(SHIPPED_MODEL), "--replica-cpus", "0.5")
    try:
        svc.ready()
        gcs = [p for p in ray_processes() - svc.before if b"gcs_server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert gcs
        os.kill(gcs[0], signal.SIGKILL)
        time.sleep(2)
        os.kill(svc.proc.pid, signal.SIGTERM)
        svc.wait(120)
        assert not svc.leftovers(), svc.stderr()[-2000:]
    finally:
        svc.close()


@pytest.mark.slow
def test_a_killed_replica_is_a_json_503_and_a_replaced_model_is_never_served(tmp_path):
    """Kill the replica mid-request: that client gets a JSON 503 and Serve's restarted replica serves again. Then
    put another model at the path and kill it again: the restart refuses the other model, /healthz says why, the
    service says so in one line and exits 1 after --ready-timeout without a replica."""
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, folder)
    svc = Service(str(folder), "--replica-cpus", "0.5", "--ready-timeout", "40")
    try:
        svc.ready()

        def replica() -> int:
            found = [p for p in ray_processes() - svc.before
                     if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::ServeReplica")]
            assert len(found) == 1, found
            return found[0]

        got: dict = {}
        client = threading.Thread(target=lambda: got.update(r=request(svc.url, "/v1/samples",
                                                                      {"num_images": 4, "steps": 1000})))
        client.start()
        time.sleep(2)
        t0 = time.monotonic()
        os.kill(replica(), signal.SIGKILL)
        client.join(60)
        status, headers, body = got["r"]
        assert status == 503 and json.loads(body)["error"].startswith("the replica stopped while sampling"), body
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 90
        while request(svc.url, "/healthz")[0] != 200:  # Serve restarts it; the same model loads
            assert time.monotonic() < deadline, svc.stderr()[-2000:]
            time.sleep(1)
        assert request(svc.url, "/v1/samples", {"num_images": 1, "steps": 2})[0] == 200
        # Another model at the path (the same graph, other bytes: a changed producer name).
        import onnx

        m = onnx.load(str(folder / "model.onnx"))
        m.producer_name = "someone-else"
        onnx.save(m, str(folder / "model.onnx"))
        t0 = time.monotonic()
        os.kill(replica(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (answer := request(svc.url, "/healthz"))[0] == 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        status, _, body = answer
        assert status == 503 and json.loads(body)["error"].startswith("no replica is serving")
        status, headers, body = request(svc.url, "/v1/samples", {"num_images": 1, "steps": 2})
        assert status == 503 and "retry-after" in {k.lower() for k in headers}
        rc = svc.wait(120)
        err = svc.stderr()
        assert rc == 1 and "no replica is serving" in err and "Traceback" not in err
        assert "error: ddim-serve: no replica for 40 s (--ready-timeout)" in err
        assert time.monotonic() - t0 < 40 + 60
        assert not svc.leftovers()
    finally:
        svc.close()
