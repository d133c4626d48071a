"""The phi4 application on Ray Serve, and `phi4 serve --replicas N`.

`build(args)` is the application builder: the CLI calls it, and so does a Serve config or a KubeRay
RayService (`import_path: phi4.cluster.app:build`, `args:` the ClusterOptions fields). It binds:
- `EngineReplica`, N replicas (or autoscaled between min and max on ongoing requests per replica), each on
  one GPU or `cpus_per_replica` CPUs, routed by `PrefixAffinityRouter`;
- `Phi4Ingress`, one replica: the same FastAPI app as `phi4 serve` (every endpoint, the chat page, the API
  key, strict bodies, admission with `--max-queue` for the whole deployment), over a RayEngineClient.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve._private import constants as serve_constants
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from phi4.cluster.client import RayEngineClient
from phi4.cluster.cpu_priority import yield_to_engines
from phi4.cluster.fleet import fleet_view
from phi4.cluster.options import ClusterOptions, use_local_ray_serve_settings
from phi4.cluster.replica import EngineReplica, runs_on_cpu
from phi4.server.serve import bind_listening_socket

logger = logging.getLogger("phi4.cluster")
APP_NAME = "phi4"
ENTRY_POINT = "phi4.cluster.app:build"  # what a Serve config or RayService imports


class Phi4Ingress:
    def __init__(self, replicas: DeploymentHandle, args: dict[str, Any]) -> None:
        from phi4.server.app import LoadingState
        from phi4.server.state import ServerState

        self.options = ClusterOptions.from_args(args)
        if _gpus(self.options) == 0:  # CPU replicas: the ingress lets their engines finish their steps
            yield_to_engines()
        self.replicas = replicas
        self.fleet = fleet_view(serve.get_replica_context().app_name)  # the router of `replicas` fills it
        options = self.options
        # Ray Serve builds the ingress on the loop that serves its requests; handle calls are made there (with
        # RAY_SERVE_THROUGHPUT_OPTIMIZED, a handle may only be used from inside that loop).
        serving_loop = asyncio.get_running_loop()

        async def first_replica_info() -> dict[str, Any]:
            return await replicas.info.remote()

        def load() -> ServerState:
            info = asyncio.run_coroutine_threadsafe(first_replica_info(), serving_loop).result()  # a replica is up
            client = RayEngineClient(replicas, options.model, self.fleet, info)
            state = ServerState(client, options.served_model_name, options.api_key, options.max_queue,
                                options.max_stop_sequences)
            state.fleet = self.fleet
            return state

        self.loading = LoadingState(load)
        self.loading.start()

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - Ray Serve's hook: the ASGI app, built on the replica
        from phi4.server.app import create_app

        return create_app(self.loading, body_timeout=self.options.body_timeout)

    async def check_health(self) -> None:
        """Ray Serve calls this every `health_check_period_s`."""
        if self.loading.error is not None:
            raise RuntimeError(f"the ingress could not start: {self.loading.error}")


def _gpus(options: ClusterOptions) -> float:
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    if options.device.startswith("cpu"):
        return 0.0
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build(args: dict[str, Any]) -> serve.Application:
    options = ClusterOptions.from_args(args)
    gpus = _gpus(options)
    actor_options: dict[str, Any] = {"num_gpus": gpus} if gpus else {"num_cpus": options.cpus_per_replica}
    scaling = options.autoscaling
    router: dict[str, Any] = {
        "request_router_class": "phi4.cluster.router:PrefixAffinityRouter",
        "request_router_kwargs": {"block_size": options.engine.block_size, "imbalance": options.prefix_imbalance},
        "request_routing_stats_period_s": 1.0, "request_routing_stats_timeout_s": 5}
    replica = serve.deployment(name="EngineReplica")(EngineReplica).options(
        num_replicas="auto" if scaling else options.replicas,
        autoscaling_config=scaling,
        ray_actor_options=actor_options,
        max_ongoing_requests=max(2 * options.engine.max_num_seqs, 16),
        request_router_config=RequestRouterConfig(**router),
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    )
    ingress = serve.deployment(name="Phi4Ingress")(serve.ingress()(Phi4Ingress)).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=options.max_queue + 256,
        health_check_period_s=2,
    )
    return ingress.bind(replica.bind(options.as_args()), options.as_args())


def serve_cluster(options: ClusterOptions, host: str, port: int, ray_address: str | None = None) -> int:
    """`phi4 serve --replicas ...`: join a Ray cluster (or start a local one), run the application until a
    signal, then take it down (and the local Ray with it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = os.environ.get("PHI4_CACHE")  # where the demo checkpoint and the CPU kernels are built
    local = ray_address is None
    if local:
        bind_listening_socket(host, port).close()  # taken: say so now, not after Ray started and HAProxy failed
        use_local_ray_serve_settings(frozenset({port}))  # Ray's processes, started below, inherit them
        if runs_on_cpu(options):
            yield_to_engines()  # and this policy too (phi4/cluster/cpu_priority.py)
        if serve_constants.RAY_SERVE_THROUGHPUT_OPTIMIZED != (os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"):
            logger.warning("Ray Serve was imported before its settings were chosen; this process reads them "
                           "otherwise than Ray's (call use_local_ray_serve_settings() before importing ray.serve)")
    ray.init(address=ray_address, namespace="phi4", log_to_driver=True,
             include_dashboard=False if local else None,  # why: beside LOCAL_RAY_SERVE_ENV (options.py)
             runtime_env={"env_vars": {"PHI4_CACHE": cache}} if cache else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(options.as_args()), name=APP_NAME, route_prefix="/")
        logger.info("phi4 on Ray Serve at http://%s:%d (%s)", host, port,
                    "autoscaling" if options.autoscaling else f"{options.replicas} replicas")
        stop.wait()
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
