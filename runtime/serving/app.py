"""The Ray Serve deployment of ``ddim-serve``: replicas of :class:`runtime.serving.core.Replica`, reached only
through the front (:mod:`runtime.serving.ingress`) by deployment handle; Serve's own HTTP proxy is not started.

A replica answers ``samples(fields)`` (validated request fields -> :class:`runtime.serving.core.Answer`),
``info()`` and ``sha256()``. It loads only the model whose sha256 the service started with
(``ServeOptions.sha256``): a replica that Ray restarts after the file was replaced or moved fails to start, and the
front reports "no replica is serving" with Ray's reason instead of serving another model.

Batching, fairness and admission are the replica's :class:`runtime.serving.batcher.Batcher`: requests that reach a
replica are all real work (the front read and checked them), so its slots are many and the batcher bounds the work.
"""

from typing import Any

from ray import serve

from runtime.serving.core import Answer, Replica, ServeOptions
from runtime.serving.scaling import Autoscale

MAX_ONGOING = 1024  # per replica: admission control (503 + Retry-After) bounds the work, not this
MAX_QUEUED = 1024  # per handle, waiting for a replica slot: over it Serve refuses (the front answers 503)


@serve.deployment(name="ddim", max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED,
                  health_check_period_s=5, health_check_timeout_s=30)
class DDIMService:
    """One replica: a loaded model and its batcher."""

    def __init__(self, options: ServeOptions) -> None:
        self.replica = Replica(options)

    async def samples(self, fields: dict[str, Any]) -> Answer:
        return await self.replica.samples(fields)

    async def info(self) -> dict[str, Any]:
        return self.replica.core.info()

    async def sha256(self) -> str:
        return self.replica.core.sha256


def build(options: ServeOptions, replicas: int = 1, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
          autoscale: Autoscale | None = None) -> Any:
    """The bound application to deploy: ``replicas`` of them, or between ``autoscale``'s bounds by load (Ray hides
    GPUs from actors that ask for none)."""
    count = {"num_replicas": replicas} if autoscale is None else autoscale.deployment_options(options.max_queue_s)
    return DDIMService.options(**count, ray_actor_options={"num_cpus": replica_cpus,
                                                           "num_gpus": replica_gpus}).bind(options)
