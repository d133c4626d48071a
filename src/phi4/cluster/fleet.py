"""What each replica tells the ingress, and how the ingress keeps it. A replica's report (`report_of`) is its
routing stats: Ray Serve collects it every second (`EngineReplica.record_routing_stats`) and hands it to
the ingress's router, which routes on it (the requests it holds, its free KV blocks) and passes it here
(`fleet_view(app).observe`) for `/health`, `/metrics` and the fleet's totals. One report, one channel, no
actor of its own and no thread in the replica.

A replica that stops reporting (it died, or its node did, or its loop is stuck) is shown unhealthy after
`STALE_SECONDS` and dropped after `FORGET_SECONDS`; Ray Serve starts its replacement, which reports under its
own id. Ages are measured on this process's clock, from when a report arrived, so the nodes' clocks need not
agree. The reports travel through Serve's controller, and pause while Ray restarts it (4.6 s when its process
was killed on an idle 2-core machine): `STALE_SECONDS` is long enough that /health does not turn every replica
stale, and 503, meanwhile; a replica that died has already left the routing by then (Ray's own health check)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from phi4.engine.engine import EngineStats

STALE_SECONDS = 10.0
FORGET_SECONDS = 60.0


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    node: str
    pid: int
    cpus: list[int]  # the CPUs it is bound to; empty: not bound
    running: int
    waiting: int
    kv_cache_usage: float
    kv_free_blocks: int
    prefix_hit_tokens: int
    requests_total: int
    generation_tokens_total: int
    requests: list[str]  # ids of the requests it holds (the router tells its own from another router's)
    at: float  # the replica's time.time() when it made the report: tells a new report from one seen before


def report_of(replica: str, node: str, pid: int, cpus: list[int], stats: EngineStats, requests_total: int,
              tokens_total: int, holding: list[str]) -> dict[str, Any]:
    return asdict(ReplicaReport(replica, node, pid, cpus, stats.num_running, stats.num_waiting, stats.kv_cache_usage,
                                stats.kv_free_blocks, stats.prefix_hit_tokens, requests_total, tokens_total, holding,
                                time.time()))


class FleetView:
    """The last report of every replica of one application, with when it arrived: totals for admission and
    the gauges, per-replica health and series. The router may run on a loop of its own (Ray Serve's
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP), hence the lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._received: dict[str, tuple[dict[str, Any], float]] = {}  # replica -> (report, its arrival)
        self._lock = threading.Lock()

    def observe(self, report: dict[str, Any]) -> None:
        """A replica's report as the router got it; Ray Serve sends every replica's with each update, so one
        seen before (the same `at`) keeps its arrival time."""
        with self._lock:
            seen = self._received.get(report["replica"])
            if seen is None or seen[0]["at"] != report["at"]:
                self._received[report["replica"]] = (report, self._clock())

    def _aged(self) -> list[tuple[dict[str, Any], float]]:
        """Each replica's last report with its age in seconds; reports older than FORGET_SECONDS are dropped."""
        now = self._clock()
        with self._lock:
            for replica in [k for k, (_, arrived) in self._received.items() if now - arrived >= FORGET_SECONDS]:
                del self._received[replica]
            return [(report, now - arrived) for report, arrived in self._received.values()]

    def _by_replica(self) -> list[tuple[dict[str, Any], float]]:
        return sorted(self._aged(), key=lambda aged: aged[0]["replica"])

    def totals(self) -> EngineStats:
        """Asked per request (admission): no sorting, no copies."""
        live = [report for report, age in self._aged() if age < STALE_SECONDS]
        if not live:
            return EngineStats()
        return EngineStats(sum(r["running"] for r in live), sum(r["waiting"] for r in live),
                           sum(r["kv_cache_usage"] for r in live) / len(live), sum(r["kv_free_blocks"] for r in live),
                           0, sum(r["prefix_hit_tokens"] for r in live))

    def health(self) -> dict[str, Any]:
        replicas = [{"replica": r["replica"], "node": r["node"], "pid": r["pid"], "cpus": r["cpus"],
                     "healthy": age < STALE_SECONDS, "running": r["running"], "waiting": r["waiting"],
                     "kv_cache_usage": round(r["kv_cache_usage"], 4), "seconds_since_report": round(age, 2)}
                    for r, age in self._by_replica()]
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
        reports = self._by_replica()
        lines = []
        for name, (kind, help_text, key) in series.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for r, age in reports:
                value = (1 if age < STALE_SECONDS else 0) if key is None else r[key]
                lines.append(f'{name}{{replica="{r["replica"]}",node="{r["node"][:12]}"}} {value:g}')
        return "\n".join(lines) + "\n"


_VIEWS: dict[str, FleetView] = {}


def fleet_view(app_name: str) -> FleetView:
    """This process's view of one application's replicas: the router writes it, the ingress reads it."""
    return _VIEWS.setdefault(app_name, FleetView())
