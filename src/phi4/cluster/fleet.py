"""Where the replicas tell the ingress how they are: a small named Ray actor that each replica reports to
once a second, and that the ingress reads (every second) for `/health`, `/metrics` and the fleet's totals.

A replica that stops reporting (it died, or its node did) is shown unhealthy after `STALE_SECONDS` and
dropped after `FORGET_SECONDS`; Ray Serve starts its replacement, which reports under its own id."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from phi4.engine.engine import EngineStats

REGISTRY_NAMESPACE = "phi4"
STALE_SECONDS = 5.0
FORGET_SECONDS = 60.0


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    node: str
    pid: int
    running: int
    waiting: int
    kv_cache_usage: float
    kv_free_blocks: int
    prefix_hit_tokens: int
    requests_total: int
    generation_tokens_total: int
    at: float  # time.time() of the report


@ray.remote(num_cpus=0)
class FleetRegistry:
    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}

    def report(self, report: dict[str, Any]) -> None:
        self._reports[report["replica"]] = report

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.time()
        self._reports = {k: r for k, r in self._reports.items() if now - r["at"] < FORGET_SECONDS}
        return sorted(self._reports.values(), key=lambda r: r["replica"])


def registry(app_name: str) -> ray.actor.ActorHandle:
    """The registry of one phi4 application, created by whoever asks first (it outlives replicas)."""
    actor_class: Any = FleetRegistry  # a Ray actor class: .options() comes from @ray.remote
    return actor_class.options(name=f"fleet-{app_name}", namespace=REGISTRY_NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


def report_of(replica: str, node: str, pid: int, stats: EngineStats, requests: int, tokens: int) -> dict[str, Any]:
    return asdict(ReplicaReport(replica, node, pid, stats.num_running, stats.num_waiting, stats.kv_cache_usage,
                                stats.kv_free_blocks, stats.prefix_hit_tokens, requests, tokens, time.time()))


class FleetView:
    """The ingress's copy of the registry, refreshed in the background: totals for admission and the
    gauges (read synchronously), per-replica health and series."""

    def __init__(self, registry_handle: ray.actor.ActorHandle) -> None:
        self._registry = registry_handle
        self.reports: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        self.reports = await self._registry.snapshot.remote()

    def live(self) -> list[dict[str, Any]]:
        now = time.time()
        return [r for r in self.reports if now - r["at"] < STALE_SECONDS]

    def totals(self) -> EngineStats:
        live = self.live()
        if not live:
            return EngineStats()
        return EngineStats(sum(r["running"] for r in live), sum(r["waiting"] for r in live),
                           sum(r["kv_cache_usage"] for r in live) / len(live), sum(r["kv_free_blocks"] for r in live),
                           0, sum(r["prefix_hit_tokens"] for r in live))

    def health(self) -> dict[str, Any]:
        now = time.time()
        replicas = [{"replica": r["replica"], "node": r["node"], "pid": r["pid"],
                     "healthy": now - r["at"] < STALE_SECONDS, "running": r["running"], "waiting": r["waiting"],
                     "kv_cache_usage": round(r["kv_cache_usage"], 4), "seconds_since_report": round(now - r["at"], 2)}
                    for r in self.reports]
        healthy = sum(r["healthy"] for r in replicas)
        return {"status": "ok" if healthy == len(replicas) and healthy else "degraded" if healthy else "unavailable",
                "healthy_replicas": healthy, "replicas": replicas}

    def render(self) -> str:
        """Every replica's own series, labelled with its id (Prometheus text format)."""
        series = {
            "phi4_replica_requests_total": ("counter", "Requests a replica has served.", "requests_total"),
            "phi4_replica_generation_tokens_total": ("counter", "Tokens a replica has generated.",
                                                     "generation_tokens_total"),
            "phi4_replica_num_requests_running": ("gauge", "Sequences in a replica's running batch.", "running"),
            "phi4_replica_num_requests_waiting": ("gauge", "Sequences waiting in a replica.", "waiting"),
            "phi4_replica_kv_cache_usage_ratio": ("gauge", "Fraction of a replica's KV blocks in use.",
                                                  "kv_cache_usage"),
            "phi4_replica_prefix_cache_hit_tokens": ("counter", "Prompt tokens a replica served from its prefix "
                                                     "cache.", "prefix_hit_tokens"),
            "phi4_replica_up": ("gauge", "1 while a replica reports, 0 once it has gone quiet.", None),
        }
        now = time.time()
        lines = []
        for name, (kind, help_text, key) in series.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for r in self.reports:
                value = (1 if now - r["at"] < STALE_SECONDS else 0) if key is None else r[key]
                lines.append(f'{name}{{replica="{r["replica"]}",node="{r["node"][:12]}"}} {value:g}')
        return "\n".join(lines) + "\n"
