"""Which replica serves a request: least-loaded by default (power of two choices on each replica's load:
sequences running and waiting, then free KV blocks), with prefix affinity — a prompt whose leading KV blocks
were last sent to one replica goes back to it, where they sit in its prefix cache, unless that replica has
`imbalance` more sequences than the least-loaded one.

A replica's load is the requests this router has sent it that have not finished — counted when it chooses,
released by Ray Serve's `on_request_completed`, so it is exact at once (a periodic report lags, and sent the
replica that had just finished work fewer requests than it could take) — plus the requests another router
sent it: those in its last report (`record_routing_stats`, collected by Ray Serve every second or so, lists
the ids of the requests it holds) that this router never sent. Reports are compared by ids, not counts: a
count taken before this router's requests finished would count them again until the next report, and in
a wave of requests finishing together that sent the next wave to the other replica (10 and 6 of 16).

The affinity map is the router's own memory of where it sent each prefix block (hashed as a chain, like the
engine's prefix cache: a block's hash covers every token before it), so it needs no round trip; a replica
that died is forgotten. The chosen replica comes first, the others after it in order of load, for Ray Serve
to fall back on if it is full.
(Ray's PrefixCacheAffinityRouter does the same on prompt text in a shared tree actor; phi4 routes on the
token ids it already has, in-process.)

The same reports carry each replica's health and counters; the router hands them to this process's fleet
view (phi4/cluster/fleet.py, where the report is defined), which `/health` and `/metrics` read."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from phi4.cluster.fleet import fleet_view
from phi4.cluster.wire import WireRequest

MAX_REMEMBERED_BLOCKS = 200_000
MAX_REMEMBERED_REQUESTS = 100_000  # ids this router sent, finished ones too: a report may still list them


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """One hash per full block of the prompt, each covering every token before its end: a chain of Python
    hashes of (previous hash, the block's tokens), as the engine's prefix cache keys its blocks. It only has to
    agree with itself inside this router, and a collision costs a cache miss, never a wrong answer."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


def _routed_request(pending: PendingRequest | None) -> tuple[str, WireRequest] | None:
    """phi4's request id and request, from a call to `EngineReplica.generate(request_id, request)`."""
    if pending is None:
        return None
    arguments = dict(zip(("request_id", "request"), pending.args)) | pending.kwargs
    request_id, request = arguments.get("request_id"), arguments.get("request")
    return (request_id, request) if isinstance(request_id, str) and isinstance(request, WireRequest) else None


class PrefixAffinityRouter(RequestRouter):
    # Ray passes request_router_kwargs here as keywords.
    def initialize_state(self, block_size: int = 16, imbalance: int = 8,  # type: ignore[override]
                         min_blocks: int = 1) -> None:
        self.block_size = block_size
        self.imbalance = imbalance
        self.min_blocks = min_blocks
        self._owners: OrderedDict[int, ReplicaID] = OrderedDict()  # block hash -> the replica that has it
        self._routed: dict[str, ReplicaID] = {}  # Ray Serve's internal request id -> the replica chosen for it
        self._in_flight: Counter[ReplicaID] = Counter()  # requests routed here and not finished, per replica
        self._sent: OrderedDict[str, None] = OrderedDict()  # phi4 ids of the requests this router sent
        # replica -> (its last report, how many of the requests it lists another router sent): counted once
        # per report, not per routing decision (a report may list hundreds of requests)
        self._others: dict[ReplicaID, tuple[dict[str, Any], int]] = {}

    def load(self, replica: RunningReplica) -> tuple[int, int]:
        """(sequences it has or will have, fewer free KV blocks first): lower is less loaded."""
        stats: dict[str, Any] = replica.routing_stats or {}
        counted = self._others.get(replica.replica_id)
        if counted is None or counted[0] is not stats:
            # Ids are unique and a report lists only started requests: one this router had not sent by then,
            # it never will, so the count holds until the next report.
            counted = (stats, sum(1 for request_id in stats.get("requests", ()) if request_id not in self._sent))
            self._others[replica.replica_id] = counted
        return self._in_flight[replica.replica_id] + counted[1], -stats.get("kv_free_blocks", 0)

    def _count(self, pending: PendingRequest | None, routed: tuple[str, WireRequest] | None,
               replica: RunningReplica) -> None:
        if pending is None:
            return
        if routed is not None:
            self._sent[routed[0]] = None
            while len(self._sent) > MAX_REMEMBERED_REQUESTS:
                self._sent.popitem(last=False)
        request_id = pending.metadata.internal_request_id
        self._release(request_id)  # a retried request is counted once, where it was chosen last
        self._routed[request_id] = replica.replica_id
        self._in_flight[replica.replica_id] += 1
        # A request cancelled before it was sent never completes: release it when its routing is cancelled.
        pending.future.add_done_callback(lambda future: self._release(request_id) if future.cancelled() else None)

    def _release(self, request_id: str) -> None:
        replica_id = self._routed.pop(request_id, None)
        if replica_id is not None and self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._release(internal_request_id)

    def _affine(self, blocks: list[int], candidates: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        """The replica holding the longest run of this prompt's leading blocks, if long enough."""
        owner, depth = None, 0
        for index, block in enumerate(blocks):
            holder = self._owners.get(block)
            if holder is None or holder not in candidates:
                break
            owner, depth = holder, index + 1
        return candidates[owner] if owner is not None and depth >= self.min_blocks else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        candidates = {replica.replica_id: replica for replica in candidate_replicas}
        routed = _routed_request(pending_request)
        blocks = prefix_block_hashes(routed[1].prompt_token_ids, self.block_size) if routed is not None else []
        loads = {replica.replica_id: self.load(replica) for replica in candidate_replicas}

        def load(replica: RunningReplica) -> tuple[int, int]:
            return loads[replica.replica_id]

        least = min(candidate_replicas, key=load)
        chosen = self._affine(blocks, candidates)
        if chosen is None or load(chosen)[0] - load(least)[0] > self.imbalance:
            pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))  # random order: ties spread
            chosen = min(pair, key=load)  # power of two choices
        self._count(pending_request, routed, chosen)
        for block in blocks:
            self._owners[block] = chosen.replica_id
            self._owners.move_to_end(block)
        while len(self._owners) > MAX_REMEMBERED_BLOCKS:
            self._owners.popitem(last=False)
        return [[chosen], sorted((r for r in candidate_replicas if r is not chosen), key=load)]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve's update of the running replicas, sent whenever one's routing stats change."""
        super().update_replicas(replicas)
        view = fleet_view(self.app_name)
        for replica in replicas:
            if replica.routing_stats:  # empty until Ray Serve has collected a first report
                view.observe(replica.routing_stats)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        self._others.pop(replica_id, None)
        for request_id in [r for r, owner in self._routed.items() if owner == replica_id]:
            del self._routed[request_id]
        for block in [b for b, owner in self._owners.items() if owner == replica_id]:
            del self._owners[block]
