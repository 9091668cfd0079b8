"""``ddim-serve --autoscale MIN:MAX``: how many replicas Ray Serve runs, and how it moves between them.

Ray Serve's autoscaler (``autoscaling_config`` of the deployment, Ray 2.60's ``ray.serve.config.AutoscalingConfig``)
counts the requests each replica has in flight or queued at our deployment handle, averaged over a look-back
window, and wants ``ceil(total / target_ongoing_requests)`` replicas, kept within MIN..MAX; it acts once that wish
has held for ``upscale_delay_s`` (up) or ``downscale_delay_s`` (down). A replica it removes is drained first: Serve
routes nothing new to it and waits for its requests to finish (``graceful_shutdown_timeout_s``, set here to outlast
``--max-queue-seconds``, the longest an admitted request is meant to wait, rather than Serve's 20 s default).

MIN is at least 1: the front reports a service without a running replica as down (503 on every request, exit
after ``--ready-timeout``), so scale-to-zero (Serve's ``min_replicas=0``) would read as an outage and the first
request after an idle spell would wait for a model to load. Ray-free (click and the standard library only): the
parsing and the config are tested without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import click

MAX_REPLICAS = 1000  # a bound, not a recommendation: each replica is a Ray actor holding a model
LOOK_BACK_S = 10.0  # the window Serve averages requests in flight over (its default of 30 s reacts slowly)
# How often the handle sends its counts to Serve's controller. Ray 2.60 reads this (deprecated) field for it; the
# environment variables announced to replace it are declared but not read yet. Its default, 10 s, would delay
# every decision by up to 10 s more.
METRICS_INTERVAL_S = 2.0
DRAIN_MARGIN_S = 30.0  # a replica being removed: --max-queue-seconds plus this for its admitted requests to finish


@dataclass(frozen=True)
class Autoscale:
    """Serve's autoscaling between ``min_replicas`` and ``max_replicas`` (``--autoscale MIN:MAX``), and how
    eagerly it moves (the defaults suit requests that take seconds: add a replica within seconds of a lasting
    rise, remove one only after a minute of less load, so a short lull does not cost a model load)."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float = 4.0
    """Requests in flight per replica that Serve aims for (a replica batches the ones it holds)."""
    upscale_delay_s: float = 10.0
    """Seconds the wish for more replicas must hold before one is added."""
    downscale_delay_s: float = 60.0
    """Seconds the wish for fewer replicas must hold before one is removed."""

    def __post_init__(self) -> None:
        bounds = f"--autoscale {self.min_replicas}:{self.max_replicas}"
        if self.min_replicas < 1:
            raise ValueError(f"{bounds}: MIN must be at least 1 (a service without a running replica counts as down; "
                             "scale-to-zero is not supported)")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"{bounds}: MAX must be at least MIN")
        if self.max_replicas > MAX_REPLICAS:
            raise ValueError(f"{bounds}: MAX must be at most {MAX_REPLICAS}")
        if not (math.isfinite(self.target_ongoing_requests) and self.target_ongoing_requests > 0):
            raise ValueError(f"--target-ongoing-requests must be a finite number > 0, got "
                             f"{self.target_ongoing_requests}")
        for flag, value in (("--upscale-delay", self.upscale_delay_s), ("--downscale-delay", self.downscale_delay_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number of seconds >= 0, got {value}")

    @property
    def label(self) -> str:
        return f"{self.min_replicas}:{self.max_replicas}"

    def serve_config(self) -> dict[str, Any]:
        """The deployment's ``autoscaling_config`` (field names of Ray 2.60's ``AutoscalingConfig``): it starts
        MIN replicas."""
        return {"min_replicas": self.min_replicas, "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": LOOK_BACK_S, "metrics_interval_s": METRICS_INTERVAL_S}

    def deployment_options(self, max_queue_s: float) -> dict[str, Any]:
        """Options of ``Deployment.options()``: the autoscaling config, and a drain long enough for a replica
        being removed to finish what it admitted (``max_queue_s``: ``--max-queue-seconds``)."""
        return {"autoscaling_config": self.serve_config(),
                "graceful_shutdown_timeout_s": max_queue_s + DRAIN_MARGIN_S}


def parse_bounds(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (MIN, MAX): two whole numbers; their rules are :class:`Autoscale`'s."""
    low, sep, high = text.strip().partition(":")
    if not sep or not all(part.strip().isascii() and part.strip().isdigit() for part in (low, high)):
        raise ValueError(f"--autoscale {text}: expected MIN:MAX, two whole numbers (e.g. 1:4)")
    return int(low), int(high)


class ReplicaBounds(click.ParamType):
    """``--autoscale MIN:MAX``: checked when parsed (a usage error naming the flag, exit 2)."""

    name = "MIN:MAX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            low, high = parse_bounds(str(value))
            Autoscale(low, high)
        except ValueError as exc:
            self.fail(str(exc).removeprefix("--autoscale "), param, ctx)
        return low, high


def autoscale_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--autoscale`` and the three settings of how it moves (read together by :func:`resolve`)."""
    defaults = Autoscale(1, 1)
    options = [
        click.option("--autoscale", type=ReplicaBounds(), default=None,
                     help="Let Ray Serve run between MIN and MAX replicas by load (MIN >= 1), instead of a fixed "
                          "--replicas; the resource check counts MAX (MIN on a joined cluster: --address)."),
        click.option("--target-ongoing-requests", type=click.FloatRange(0, min_open=True), default=None,
                     help="With --autoscale: requests in flight per replica that Serve aims for "
                          f"[default: {defaults.target_ongoing_requests:g}]."),
        click.option("--upscale-delay", "upscale_delay_s", type=click.FloatRange(0), default=None,
                     help="With --autoscale: seconds more load must last before a replica is added "
                          f"[default: {defaults.upscale_delay_s:g}]."),
        click.option("--downscale-delay", "downscale_delay_s", type=click.FloatRange(0), default=None,
                     help="With --autoscale: seconds less load must last before a replica is removed "
                          f"[default: {defaults.downscale_delay_s:g}]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def resolve(replicas: int | None, bounds: tuple[int, int] | None, target_ongoing_requests: float | None,
            upscale_delay_s: float | None, downscale_delay_s: float | None) -> tuple[int, Autoscale | None]:
    """(replicas to start, the autoscaling or None) from the options as given; ``--replicas`` and
    ``--autoscale`` exclude each other, and the settings of ``--autoscale`` need it (click.UsageError, exit 2)."""
    if bounds is None:
        given = [flag for flag, value in (("--target-ongoing-requests", target_ongoing_requests),
                                          ("--upscale-delay", upscale_delay_s),
                                          ("--downscale-delay", downscale_delay_s)) if value is not None]
        if given:
            raise click.UsageError(f"{given[0]} needs --autoscale MIN:MAX")
        return (1 if replicas is None else replicas), None
    if replicas is not None:
        raise click.UsageError(f"--replicas {replicas} and --autoscale {bounds[0]}:{bounds[1]} exclude each other: "
                               "give a fixed count or a range")
    settings = {k: v for k, v in (("target_ongoing_requests", target_ongoing_requests),
                                  ("upscale_delay_s", upscale_delay_s),
                                  ("downscale_delay_s", downscale_delay_s)) if v is not None}
    scaling = Autoscale(bounds[0], bounds[1], **settings)
    return scaling.min_replicas, scaling
