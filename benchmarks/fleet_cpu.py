"""Where a 2-replica Ray Serve fleet spends the machine's CPU: per process (the replicas, the ingress, Ray's
own processes, HAProxy, the load generator), from each process's CPU time in /proc before and after, first
with no request for `--idle-seconds`, then under the streaming workload of scale_out.py. Linux only.

On a 2-core machine two single-thread engines could use all of it; whatever the other rows add up to is
what the replicas lose. Prints one JSON line per phase: tokens/s (under load) and the processes over 0.2 %
of a core, in percent of one core.

Usage: python benchmarks/fleet_cpu.py [--shape demo|medium|large] [--requests 400] [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from scale_out import start, warm_up  # benchmarks/scale_out.py
from serve_load import add_workload_arguments, drive, stop_server, workload  # benchmarks/serve_load.py

from phi4.bench import cpu_name
from phi4.demo import BENCHMARK_SHAPES, write_shaped_checkpoint

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (user + system ticks so far, its command line or name)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        name_end = stat.rindex(")")
        fields = stat[name_end + 2 :].split()
        name = command.strip()[:80] or stat[stat.index("(") + 1 : name_end]  # kernel threads have no command
        table[int(entry)] = (int(fields[11]) + int(fields[12]), name)
    return table


def percent_of_a_core(before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]], seconds: float
                      ) -> dict[str, float]:
    used = {}
    for pid, (ticks, command) in after.items():
        share = 100 * (ticks - before.get(pid, (0, command))[0]) / TICKS_PER_SECOND / seconds
        if share > 0.2:
            used[f"{pid} {command}"] = round(share, 1)
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, requests=400)
    parser.add_argument("--shape", choices=["demo", *BENCHMARK_SHAPES], default="demo")
    parser.add_argument("--idle-seconds", type=float, default=20)
    args = parser.parse_args()
    checkpoint = tempfile.TemporaryDirectory()
    model = "demo" if args.shape == "demo" else str(write_shaped_checkpoint(Path(checkpoint.name), args.shape))
    process, url = start(["--replicas", "2", "--cpus-per-replica", "1"], None, model)
    try:
        warm_up([url], args.prompt_tokens)
        time.sleep(5)
        before = cpu_ticks()
        time.sleep(args.idle_seconds)
        idle = percent_of_a_core(before, cpu_ticks(), args.idle_seconds)
        print(json.dumps({"phase": "idle", "shape": args.shape, "cpu": cpu_name(),
                          "total_percent_of_a_core": round(sum(idle.values()), 1), "processes": idle}), flush=True)
        before, began = cpu_ticks(), time.monotonic()
        figures = drive(url, workload(args.requests, args.prompt_tokens), args.clients, args.output_tokens,
                        args.max_seconds)
        output_tok_s = asyncio.run(figures)["output_tok_s"]
        loaded = percent_of_a_core(before, cpu_ticks(), time.monotonic() - began)
        print(json.dumps({"phase": "load", "shape": args.shape, "cpu": cpu_name(),
                          "output_tok_s": round(output_tok_s, 1),
                          "total_percent_of_a_core": round(sum(loaded.values()), 1), "processes": loaded}), flush=True)
    finally:
        stop_server(process)


if __name__ == "__main__":
    main()
