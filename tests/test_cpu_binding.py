"""Which cores a CPU replica of each local rank takes (phi4/cluster/cpu_binding.py), on node layouts this
machine does not have, and that binding a process holds for its threads, those started later included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from phi4.cluster.cpu_binding import CoreOf, cpus_for_rank, ray_owns_them, spread_order


def siblings_apart(cores: int) -> CoreOf:
    """Linux's usual numbering: CPU i and i + cores are the two threads of one core."""
    return lambda cpu: (0, cpu % cores)


def siblings_adjacent(cpu: int) -> tuple[int, int]:  # some VMs number a core's two threads one after the other
    return 0, cpu // 2


def one_core_each(cpu: int) -> tuple[int, int]:
    return 0, cpu


def test_replicas_of_a_two_core_node_take_one_core_each_and_a_third_is_left_unbound() -> None:
    taken = [cpus_for_rank(rank, 1, {0, 1}, one_core_each) for rank in range(3)]
    assert taken == [frozenset({0}), frozenset({1}), None]


def test_replicas_take_distinct_physical_cores_before_any_core_s_second_thread() -> None:
    apart = siblings_apart(4)
    assert [cpus_for_rank(rank, 1, range(8), apart) for rank in range(5)] == \
        [frozenset({0}), frozenset({1}), frozenset({2}), frozenset({3}), frozenset({4})]
    assert [cpus_for_rank(rank, 2, range(8), apart) for rank in range(4)] == \
        [frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({6, 7})]
    assert spread_order(range(8), siblings_adjacent) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert cpus_for_rank(0, 2, range(8), siblings_adjacent) == frozenset({0, 2})  # two cores, not one core's pair
    assert cpus_for_rank(4, 2, range(8), siblings_adjacent) is None


def test_only_the_cpus_the_node_allows_are_shared_out() -> None:
    allowed = {2, 3, 5}  # a cgroup's cpuset or a taskset
    assert [cpus_for_rank(rank, 1, allowed, one_core_each) for rank in range(4)] == \
        [frozenset({2}), frozenset({3}), frozenset({5}), None]


@pytest.mark.parametrize("share", [0.5, 1.5, 0])
def test_a_share_of_part_of_a_core_is_not_bound(share: float) -> None:
    assert cpus_for_rank(0, share, range(4), one_core_each) is None


def test_a_node_whose_cpus_ray_does_not_own_is_not_bound() -> None:
    assert ray_owns_them(2, frozenset({0, 1}))
    assert not ray_owns_them(4, frozenset(range(16)))  # a Kubernetes pod with a quota of 4 on a 16-core host
    assert not ray_owns_them(0, frozenset({0, 1}))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_binding_a_process_binds_its_running_threads_and_the_ones_it_starts_later() -> None:
    cpu = min(os.sched_getaffinity(0))
    script = f"""
import os, threading
from phi4.cluster.cpu_binding import bind_process
started = threading.Event(); stop = threading.Event()
def work():
    started.set(); stop.wait()
before = threading.Thread(target=work); before.start(); started.wait()
bind_process({{{cpu}}})
later = threading.Thread(target=work); later.start()
print(sorted({{tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}}))
stop.set(); before.join(); later.join()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"[({cpu},)]"
