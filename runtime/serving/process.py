"""What the ``ddim-serve`` process does besides serving: checks before it binds (the port, the file-descriptor limit),
SIGINT taken back from an inherited SIG_IGN, importing Ray with a one-line hint, Ray's environment and log level, the
lines it prints (also from signal handlers), and the :class:`Watchdog` that bounds every startup stage. Shared by
:mod:`runtime.serving.cli` and ``ddim-run --cluster`` (:mod:`runtime.cluster.run`: environment and logs)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import click

from runtime.common.clitools import one_line
from runtime.common.extras import install_hint


def check_port_free(host: str, port: int) -> None:
    """Fail now, in one line, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another --port") from None


def loopback(host: str) -> bool:
    """Whether ``--host`` listens on this machine only."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def raise_file_limit(max_connections: int, spare: int = 512) -> None:
    """Each client connection is a file descriptor: raise the soft limit to fit ``--max-connections`` plus what
    Ray and the model use, or refuse in one line when the hard limit cannot (accept() would fail with EMFILE in a
    loop instead)."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the OS decides
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise ValueError(f"--max-connections {max_connections}: needs {want} open files, the hard limit is {hard}"
                             f" (ulimit -Hn); lower --max-connections to at most {max(1, hard - spare)}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def take_sigint() -> None:
    """SIGINT raises KeyboardInterrupt from now on, whatever disposition the process inherited. A job a script
    starts in the background inherits SIGINT ignored, and Python then leaves it ignored: Ctrl-C and ``kill -INT``
    would do nothing until :class:`Run` installs its own handler (after the model loads and Ray is imported)."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise click.ClickException(f"ddim-serve needs Ray Serve: {install_hint('serve')}") from None
    return ray, serve


# Defaults only: the environment wins. Usage stats off (no network here). (Serve's proxy is not started: its
# readiness timeout is not set any more.)
RAY_SERVE_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}


def serve_environment() -> None:
    """Set :data:`RAY_SERVE_DEFAULTS` where the environment has no value (before Ray starts: its processes
    inherit it)."""
    for key, value in RAY_SERVE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_ray_logs() -> None:
    for name in ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def say(message: str) -> None:
    click.echo(f"ddim-serve: {message}", err=True)


def _write(text: str) -> None:
    """stderr from a signal handler: one os.write (click.echo there can raise a reentrant-call error)."""
    try:
        os.write(2, text.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


class Watchdog:
    """Ends the process with one line when a stage outlasts its deadline (ray.init, Serve and placement can wait
    forever without a word); ``stage`` names what is running, ``detail()`` what Ray says about it."""

    def __init__(self, timeout_s: float, detail: Any = None) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.stage = "starting"
        self.detail = detail
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="ddim-serve-watchdog").start()

    def _watch(self) -> None:
        if self._done.wait(max(0.0, self.deadline - time.monotonic())):
            return
        why = ""
        if self.detail is not None:  # asked in a thread of its own: Ray itself may be what hangs
            said: list[str] = []

            def ask() -> None:
                try:
                    said.append(f" ({self.detail()})")
                except Exception as exc:  # noqa: BLE001
                    said.append(f" (Ray did not say why: {one_line(exc)})")

            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            asker.join(5)
            why = said[0] if said else " (Ray does not answer)"
        click.echo(f"error: ddim-serve: {self.stage} did not finish within the --ready-timeout of "
                   f"{self.timeout_s:g} s{why}", err=True)
        from runtime.serving.cluster import end_descendants

        end_descendants(grace_s=2.0)
        os._exit(1)

    def done(self) -> None:
        self._done.set()
