"""The ddim-serve command line: refusals before Ray starts, and the real start -> ready -> Ctrl-C cycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from runtime.common.shipped import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.serving.cli", *args]


def test_bad_model_and_busy_port_fail_in_one_line_before_ray(tmp_path):
    start = time.monotonic()
    missing = subprocess.run(serve_cmd(str(tmp_path / "nope")), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} does not exist"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"")
    torch_run = subprocess.run(serve_cmd(str(run_dir), "--backend", "torch"), cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert torch_run.returncode == 2 and "'torch' is not one of" in torch_run.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run(serve_cmd(str(SHIPPED_MODEL), "--port", str(port)), cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines()[-1] == (f"error: --host 127.0.0.1 --port {port}: cannot listen there "
                                                     "(Address already in use); pick another --port")
    assert "starting a local Ray instance" not in taken.stderr
    assert time.monotonic() - start < 45  # nothing above waited for Ray


def test_start_ready_serve_and_ctrl_c(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(serve_cmd(str(SHIPPED_MODEL), "--port", str(port), "--max-batch", "4", "--threads", "1",
                                      "--replica-cpus", "0.5", "--batching", "request"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # as a terminal's foreground job: SIGINT at its default, even where pytest's parent
                            # (or an earlier test) left it ignored, which the child would inherit and keep
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(150)
        assert line and line[0].strip() == f"http://127.0.0.1:{port}", (line, proc.poll())
        with urllib.request.urlopen(f"{line[0].strip()}/healthz", timeout=30) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/samples", method="POST",
                                     data=json.dumps({"num_images": 2, "steps": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and resp.read().startswith(b"\x89PNG")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=30) as resp:
            assert json.loads(resp.read())["batching"] == "request"  # the option reached the replica
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group, Ray's own processes too
        try:  # the CLI bounds Serve's shutdown at 60 s, then stops Ray: allow both on a loaded machine
            rc = proc.wait(150)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"no exit 150 s after Ctrl-C; stderr: {proc.communicate()[1][-1500:]}")
        err = proc.stderr.read()
        assert rc == 0, err[-1500:]
        assert "ddim-serve: ready at http://127.0.0.1:" in err and err.rstrip().endswith("ddim-serve: stopped")
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:  # the port is free again: Serve's proxy is gone
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("option, value, message", [
    ("--max-batch", "0", "0 is not in the range 1<=x<=4096"),
    ("--replica-cpus", "nan", "nan is not a finite number"),
    ("--ready-timeout", "nan", "nan is not a finite number"),
    ("--threads", "10000", "10,000 is more than the"),
    ("--port", "70000", "70000 is not in the range 1<=x<=65535"),
    ("--batching", "token", "'token' is not one of 'step', 'request'"),
])
def test_option_ranges(option, value, message):
    from click.testing import CliRunner

    from runtime.serving.cli import main

    result = CliRunner().invoke(main, [str(SHIPPED_MODEL), option, value])
    assert result.exit_code == 2 and message in result.output


def test_a_cuda_model_needs_replica_gpus(monkeypatch):
    """Ray hides GPUs from actors that ask for none: a model picked onto CUDA with --replica-gpus 0 is refused."""
    from click.testing import CliRunner

    import runtime.serving.core as core
    from runtime.serving.cli import main

    class OnCuda:
        def __init__(self, options):
            self.sampler = type("S", (), {"why": "stand-in", "backend": type("B", (), {"device": "cuda"})()})()

    monkeypatch.setattr(core, "ModelService", OnCuda)
    result = CliRunner().invoke(main, [str(SHIPPED_MODEL), "--replica-gpus", "0"])
    assert result.exit_code == 2 and "--replica-gpus is 0: Ray would hide the GPU" in result.output


def test_max_connections_must_fit_the_open_file_limit(monkeypatch):
    import resource

    from runtime.serving.cli import raise_file_limit

    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 1024))
    set_to: list = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: set_to.append(limits))
    raise_file_limit(500)
    assert set_to == [(1012, 1024)]
    with pytest.raises(ValueError, match=r"--max-connections 1000: needs 1512 open files, the hard limit is 1024 "
                                         r"\(ulimit -Hn\); lower --max-connections to at most 512"):
        raise_file_limit(1000)


# -- the API token: refused in one line before anything loads; never echoed ------------------------------------------

@pytest.mark.parametrize("args, env, message", [
    (["--api-token", "sh0rt"], {}, "error: --api-token: the API token has 5 characters, it needs at least 16"),
    (["--api-token", "with spaces in the token"], {}, "error: --api-token: the API token must be printable ASCII"),
    ([], {"DDIM_SERVE_TOKEN": ""}, "error: DDIM_SERVE_TOKEN: the API token is empty, it needs at least 16"),
    ([], {"DDIM_SERVE_TOKEN": "sh0rt"}, "error: DDIM_SERVE_TOKEN: the API token has 5 characters"),
    (["--api-token-file", "{tmp}/missing"], {},
     "error: --api-token-file {tmp}/missing: cannot read it (No such file or directory)"),
    (["--api-token-file", "{tmp}/empty"], {}, "error: --api-token-file {tmp}/empty: the file is empty"),
    (["--api-token-file", "{tmp}/short"], {}, "error: --api-token-file {tmp}/short: the API token has 5 characters"),
])
def test_a_bad_api_token_is_one_line_before_anything_loads(tmp_path, args, env, message):
    from click.testing import CliRunner

    from runtime.serving.cli import main

    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text("sh0rt\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner(env=env).invoke(main, [str(tmp_path / "no-model"), *args])  # the model is never looked at
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.replace("{tmp}", str(tmp_path))), lines
    assert "sh0rt" not in result.output and "with spaces" not in result.output


def test_the_token_option_wins_then_the_file_then_the_environment(tmp_path):
    from runtime.serving.auth import resolve_token

    option, in_file, in_env = "option-token-0123456789", "file-token-0123456789", "env-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(in_file + "\r\n")
    env = {"DDIM_SERVE_TOKEN": in_env}
    assert resolve_token(option, None, env) == (option, "--api-token")
    assert resolve_token(None, token_file, env) == (in_file, f"--api-token-file {token_file}")
    assert resolve_token(None, None, env) == (in_env, "DDIM_SERVE_TOKEN")
    assert resolve_token(None, None, {}) == (None, "")
    with pytest.raises(ValueError, match="give --api-token or --api-token-file, not both"):
        resolve_token(option, token_file, env)
    with pytest.raises(ValueError, match="not a regular file"):
        resolve_token(None, tmp_path, {})


def test_sigint_inherited_as_ignored_stops_the_checks_before_ray():
    """A script's background job inherits SIGINT ignored. ddim-serve takes it back first thing: SIGINT while it
    checks the cluster address (a listener whose accept queue is full: the connect hangs) ends it at once, exit 130,
    instead of being ignored until Ray starts."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fill = []
        for _ in range(3):  # the queue full: further SYNs are dropped, connect() waits for its 5 s timeout
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fill.append(s)
        proc = subprocess.Popen(serve_cmd(str(SHIPPED_MODEL), "--backend", "onnxruntime", "--device", "cpu",
                                          "--address", f"127.0.0.1:{port}"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            first = proc.stderr.readline()  # the model is loaded: the address check comes next
            assert first.startswith("ddim-serve: "), first
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            rc = proc.wait(30)
            err = proc.stderr.read()
            assert (rc, err.strip()) == (130, "error: interrupted"), (rc, err)
            assert time.monotonic() - t0 < 3  # not the address check's 5 s timeout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for s in fill:
                s.close()
