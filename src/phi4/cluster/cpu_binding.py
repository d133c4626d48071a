"""Cores of its own for each CPU replica on a node.

Ray gives a CPU replica `cpus_per_replica` logical CPUs of its node as a count, not as particular cores, so the
OS moves every replica's engine thread from core to core, and two engines meet on one core while the other
serves the ingress. Bound to distinct cores, each engine keeps its caches and its core; what else runs on the
node (the ingress, Ray's processes, HAProxy) takes turns beside them. vLLM's CPU backend binds its workers'
threads the same way (VLLM_CPU_OMP_THREADS_BIND=auto); here with Ray Serve's local rank, which numbers a
deployment's replicas on each node 0..k-1 and is kept so as replicas come and go.

A replica binds only when its share is whole cores and its rank's cores exist on the node: fractional shares
are meant to share cores, and a replica beyond the node's cores is left to the OS (as before)."""

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
