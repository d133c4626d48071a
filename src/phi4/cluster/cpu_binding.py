"""Cores of its own for each CPU replica on a node.

Ray gives a CPU replica `cpus_per_replica` logical CPUs of its node as a count, not as particular cores, so the
OS moves every replica's engine thread from core to core, and two engines can meet on one core while the other
serves the ingress. Bound to distinct cores, each engine keeps its caches and its core; what else runs on the
node (the ingress, Ray's processes, HAProxy) takes turns beside them. vLLM's CPU backend binds its workers'
threads the same way (VLLM_CPU_OMP_THREADS_BIND=auto); here with Ray Serve's local rank, which numbers a
deployment's replicas on each node 0..k-1 (a replacement takes the rank of the replica it replaces; when
replicas leave, Ray renumbers the rest and tells each through `reconfigure`, and the replica binds again).

A replica binds only when its share is whole cores, its rank's cores exist on the node, and Ray's CPU count for
the node covers every CPU the replica can see (`ray_owns_them`): fractional shares are meant to share cores, a
replica beyond the node's cores is left to the OS (as before), and so is one on a node that shares its CPUs
with others. Two phi4 applications on one Ray node would number their replicas from 0 each: serve the second
with --no-bind-cpus."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

CoreOf = Callable[[int], tuple[int, int]]


def physical_core(cpu: int) -> tuple[int, int]:
    """(package, core) of a logical CPU, from sysfs; a CPU sysfs says nothing about is a core of its own."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text())
    except (OSError, ValueError):
        return -1, cpu


def spread_order(cpus: Iterable[int], core_of: CoreOf = physical_core) -> list[int]:
    """The CPUs ordered one hardware thread of every physical core first, then every core's second thread, and so
    on: the first k of the list are k distinct cores whenever the node has that many."""
    threads_seen: dict[tuple[int, int], int] = {}
    keyed = []
    for cpu in sorted(cpus):
        core = core_of(cpu)
        thread = threads_seen.get(core, 0)
        threads_seen[core] = thread + 1
        keyed.append((thread, core, cpu))
    return [cpu for _, _, cpu in sorted(keyed)]


def cpus_for_rank(local_rank: int, cpus_per_replica: float, node_cpus: Iterable[int],
                  core_of: CoreOf = physical_core) -> frozenset[int] | None:
    """The CPUs the replica of this local rank takes, or None when it should not be bound."""
    share = int(cpus_per_replica)
    if share < 1 or share != cpus_per_replica:
        return None
    ordered = spread_order(node_cpus, core_of)
    first = local_rank * share
    if local_rank < 0 or first + share > len(ordered):
        return None
    return frozenset(ordered[first : first + share])


def ray_owns_them(ray_node_cpus: float, cpus: frozenset[int]) -> bool:
    """Whether Ray's CPU count for this node covers every CPU the process may use. Where it does not (a pod in
    Kubernetes' shared CPU pool sees every CPU of its host and has a quota of a few; `ray start --num-cpus` below
    the machine's count), other Ray nodes on the same machine see the same CPUs and number their replicas from
    0 too: binding by rank would put them all on the first cores."""
    return ray_node_cpus >= len(cpus) > 0


def node_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its cgroup's and any taskset's limits included); empty off Linux."""
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def bind_process(cpus: Iterable[int]) -> None:
    """Every thread of this process onto `cpus` (Linux binds threads one at a time; threads started later
    inherit their parent's)."""
    allowed = set(cpus)
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), allowed)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
