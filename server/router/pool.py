"""The replicas behind the router: their health and load, polled from each replica's /health and /metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("spindle.router")

_LOAD_GAUGES = ("spindle:num_requests_running", "spindle:num_requests_waiting")
# A busy replica answers /health late, not never (its event loop shares the CPU with the engine): only a replica
# silent this long is taken for failed.
HEALTH_CHECK_TIMEOUT = 10.0


@dataclass
class Replica:
    url: str
    healthy: bool = False  # until its first health check passes
    in_flight: int = 0  # requests this router has open on it now
    reported_load: float = 0.0  # requests running + waiting at its last /metrics poll (all clients, not just us)

    @property
    def load(self) -> float:
        """Requests on the replica: the router's own count is exact and current, the polled figure also counts
        other clients' requests but is up to a poll interval old; the larger of the two is the better estimate."""
        return max(float(self.in_flight), self.reported_load)


def reported_load(metrics_text: str) -> float:
    """Requests running plus waiting, summed over every model a replica's /metrics reports."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name in _LOAD_GAUGES:
            total += sum(sample.value for sample in family.samples)
    return total


class ReplicaPool:
    """The replicas and their state. A replica leaves rotation when a health check or a connection to it fails,
    and comes back when a health check passes again."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, poll_headers: dict[str, str] | None = None) -> None:
        self.replicas = [Replica(url) for url in urls]
        self.client = client
        self.poll_headers = poll_headers or {}

    def healthy(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.healthy]

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(replica) for replica in self.replicas))

    async def check(self, replica: Replica) -> None:
        """/health decides whether the replica is in rotation; /metrics, when it can be read, gives its load."""
        headers, timeout = self.poll_headers, HEALTH_CHECK_TIMEOUT
        try:
            health = await self.client.get(f"{replica.url}/health", headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            self._set_health(replica, False, f"/health: {type(exc).__name__}: {exc}")
            return
        self._set_health(replica, health.status_code == 200, f"/health answered {health.status_code}")
        try:
            metrics = await self.client.get(f"{replica.url}/metrics", headers=headers, timeout=timeout)
            if metrics.status_code == 200:
                replica.reported_load = reported_load(metrics.text)
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: not Prometheus text; the last load stands
            logger.debug("cannot read the load of %s: %s", replica.url, exc)

    def mark_failed(self, replica: Replica, reason: str) -> None:
        """A request could not reach the replica: out of rotation until a health check passes again."""
        self._set_health(replica, False, reason)

    def _set_health(self, replica: Replica, healthy: bool, reason: str) -> None:
        if healthy != replica.healthy:
            if healthy:
                logger.info("replica %s is healthy: in rotation", replica.url)
            else:
                logger.warning("replica %s is out of rotation (%s)", replica.url, reason)
        replica.healthy = healthy

    async def poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.check_all()
