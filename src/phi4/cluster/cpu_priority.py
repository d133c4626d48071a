"""On a CPU node the engines and everything that serves them share the cores: the ingress, Ray's processes
(GCS, raylet, the Serve controller, the proxies, HAProxy) and each replica's own I/O threads (its event loop,
gRPC). Linux's scheduler lets a thread that wakes up preempt the one running, so every message the ingress
handles and every output a replica streams broke into an engine's decoding step. With two one-core replicas
on a 2-core machine the engine threads spent 19 % more CPU per token than the one engine of a 1-replica fleet,
which has a core to itself (per-thread CPU time from /proc; README "Many replicas").

So in a fleet whose replicas run on CPU every thread is SCHED_BATCH except each replica's engine thread.
A SCHED_BATCH thread that wakes up does not preempt: it runs when the engine's time slice ends or the engine
waits, and takes its share of the CPU as before (the policy changes when, not how much). Linux allows any
process to choose it for its own threads. A local fleet's `phi4 serve` takes it before starting Ray, so Ray's
processes inherit it; the ingress and each replica take it themselves, which also covers a cluster that phi4
did not start. GPU fleets are left as they are: there an engine thread mostly waits for its device."""

from __future__ import annotations

import contextlib
import os

# Linux's policies; os.SCHED_BATCH exists only where the platform has it.
SCHED_OTHER = getattr(os, "SCHED_OTHER", 0)
SCHED_BATCH = getattr(os, "SCHED_BATCH", None)


def yield_to_engines(engine_thread: int | None = None) -> bool:
    """Every thread of this process under SCHED_BATCH, but `engine_thread` (a native thread id) under SCHED_OTHER.
    Linux sets the policy thread by thread; threads started later inherit their creator's. False where the
    platform has no SCHED_BATCH or refuses it (then nothing is changed that matters: the default policy)."""
    if SCHED_BATCH is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        threads = [int(thread) for thread in os.listdir("/proc/self/task")]
    except OSError:
        return False
    default = os.sched_param(0)  # the only priority these two policies have
    try:
        for thread in threads:
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setscheduler(thread, SCHED_OTHER if thread == engine_thread else SCHED_BATCH, default)
    except OSError:  # e.g. a seccomp profile that forbids it
        return False
    return True
