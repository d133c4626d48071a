"""One engine replica: an LLMEngine on one device (a GPU, or a share of a CPU node's cores), serving the
ingress's prepared requests as streams, and reporting its load and health in its routing stats, which Ray
Serve collects every second and hands to the ingress's router (`record_routing_stats`).

Cancellation: when the ingress cancels a stream (its client went away), Ray Serve cancels this generator;
closing the engine stream aborts the request in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ReplicaRank

from phi4.cluster.cpu_binding import (
    bind_process,
    cpus_for_rank,
    node_cpus,
    ray_owns_them,
)
from phi4.cluster.cpu_priority import yield_to_engines
from phi4.cluster.fleet import report_of
from phi4.cluster.options import ClusterOptions
from phi4.cluster.wire import WireRequest
from phi4.engine.client import InProcessEngine, RequestOutput

logger = logging.getLogger("phi4.cluster")


def _ray_cpus_of(node: str) -> float:
    """The CPU count Ray gives this node (`ray start --num-cpus`, a pod's quota, else the machine's)."""
    return next((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["NodeID"] == node), 0.0)


def runs_on_cpu(options: ClusterOptions) -> bool:
    """Whether a replica on this machine runs its engine on CPU: no GPU asked for, and none here."""
    import torch

    return options.gpus_per_replica in (None, 0) and not torch.cuda.is_available()


def _without_prompt(output: RequestOutput) -> RequestOutput:
    return dataclasses.replace(output, prompt_token_ids=[])


class EngineReplica:
    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        from phi4.engine.engine import LLMEngine
        from phi4.model.loader import resolve_checkpoint

        options = ClusterOptions.from_args(args)
        on_cpu = runs_on_cpu(options)
        if on_cpu:
            torch.set_num_threads(max(1, int(options.cpus_per_replica)))  # this replica's share of the node
        self.node = ray.get_runtime_context().get_node_id()
        self.node_cpus = node_cpus()  # before any binding: a later rank picks among all of them
        bind = on_cpu and options.bind_cpus and ray_owns_them(_ray_cpus_of(self.node), self.node_cpus)
        self.binding_share = options.cpus_per_replica if bind else None  # None: no binding
        self.cpus: list[int] = []  # the CPUs this replica is bound to; empty: wherever the OS runs it
        engine = LLMEngine(resolve_checkpoint(options.model), options.engine, options.device, options.dtype)
        self.engine = InProcessEngine(engine)
        if on_cpu:  # the engine thread first on its cores (phi4/cluster/cpu_priority.py)
            yield_to_engines(self.engine.engine_thread_id)
        self.stream_interval = options.stream_interval_ms / 1000
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.requests = 0
        self.tokens = 0
        self.holding: set[str] = set()  # ids of the requests started here and not finished (for the router)
        logger.info("replica %s ready on node %s (pid %d)", self.replica_id, self.node, os.getpid())

    def reconfigure(self, user_config: Any, rank: ReplicaRank | None) -> None:
        """Ray Serve calls this once the replica is up, and again when its rank changes (replicas came or went on
        its node): a CPU replica takes its rank's cores (phi4/cluster/cpu_binding.py)."""
        if rank is None or self.binding_share is None:
            return
        cpus = cpus_for_rank(rank.local_rank, self.binding_share, self.node_cpus)
        if cpus is None and not self.cpus:
            return  # never bound, nothing to undo
        try:
            bind_process(cpus or self.node_cpus)  # no cpus for this rank: back to the start-up set
        except OSError as exc:  # e.g. the cpuset shrank since start-up: run unbound rather than fail
            logger.warning("replica %s left unbound: binding it to CPUs %s failed (%s)", self.replica_id,
                           sorted(cpus or ()), exc)
            self.binding_share, self.cpus = None, []
            with contextlib.suppress(OSError):  # undo what a bind that failed half-way did, where it can
                bind_process(self.node_cpus)
            return
        self.cpus = sorted(cpus or ())
        logger.info("replica %s (local rank %d) on CPUs %s", self.replica_id, rank.local_rank, self.cpus or "any")

    def info(self) -> dict[str, Any]:
        return {"max_model_len": self.engine.max_model_len, "vocab_size": self.engine.vocab_size,
                "eos_token_ids": sorted(self.engine.engine.eos_token_ids), "replica": self.replica_id}

    async def generate(self, request_id: str, request: WireRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs, the first at once (time to first token is not delayed), then whatever came in
        each `stream_interval` merged into one (every streamed item costs a Ray message, and the ingress one
        SSE event and one socket write, so one per token would spend the CPU the engine needs), and the last
        at once; the engine thread merges them (InProcessEngine.generate), so this loop wakes only to send. The
        prompt stays behind: the ingress has it, and a long one would travel with every item."""
        self.requests += 1
        self.holding.add(request_id)
        stream = None
        try:
            grammars = self.engine.engine.grammars
            prepared = await asyncio.to_thread(request.prepared, grammars) if request.params.grammar is not None \
                else request.prepared(grammars)  # compiling may take a while: not on the replica's event loop
            stream = self.engine.generate(request_id, prepared, self.stream_interval)
            async for output in stream:  # it ends with a finished output (or raises)
                self.tokens += len(output.new_token_ids)
                yield _without_prompt(output)
        finally:
            self.holding.discard(request_id)
            if stream is not None:
                stream.close()  # early end (cancelled by the ingress): the engine aborts the request

    def record_routing_stats(self) -> dict[str, Any]:
        """This replica's report: the router's load figures and /health's and /metrics' (phi4/cluster/fleet.py)."""
        return report_of(self.replica_id, self.node, os.getpid(), self.cpus, self.engine.stats(), self.requests,
                         self.tokens, list(self.holding))

    def __del__(self) -> None:
        self.engine.shutdown()
