"""Scale-out on Ray Serve: the same streaming workload against `phi4 serve --model demo` as one process and
on Ray Serve with 1 and then 2 replicas, every engine limited to one CPU thread, in one run; and, for what the
machine itself allows, two independent one-process servers with the clients split evenly between them.

Prints one JSON line per arm (output tokens/s, requests/s, TTFT and ITL percentiles, as the clients saw
them) and a summary: the scaling ratio (2 replicas over 1; target >= 1.6 on a 2-core machine), the routing
overhead (1 replica through Ray over the same single engine in one process; target >= 0.85), the machine's
own ratio (2 independent processes over 1) and how much of it Ray Serve keeps. Prefix caching is off and
the prompts are random, so routing cannot win by cache hits.

Two engines of one thread each fill a 2-core machine, so Ray's own processes (the controller, GCS, the
ingress and proxy, their idle polling) take their CPU from the engines; and the same clients split over two
engines make batches half as big, which costs throughput wherever a step is bound by reading the weights.
The 1-replica fleet has neither cost: its engine keeps a core to itself while the ingress does the HTTP work on
the other. The summary's ceiling (2 independent processes over Ray's 1 replica) is what 2 over 1 would read if
the 2-replica fleet lost nothing to Ray (2 over 1 = ceiling x what Ray keeps of 2 processes); where the ceiling
itself is under 1.6 (the demo, whose engine is fast next to the HTTP work around it), no fleet reaches the target.

`--shape medium|large` serves a larger random checkpoint (the demo's tokenizer; medium: hidden 768, 6
layers, ~4 ms of one core per token; large: hidden 1536, 12 layers, ~25 ms), closer to a real model, where
the engines and not the HTTP and Ray messaging around them are the bottleneck.

The host's speed drifts (on a shared 2-vCPU VM by 10-25 % from one minute to the next), so one pass over
the arms can put a fast minute under one arm and a slow one under the next. `--rounds` repeats the four arms,
every other round in reverse order (1 and 2 replicas always run back to back), and the summary gives each
ratio per round and their median.

Usage: python benchmarks/scale_out.py [--shape demo|medium|large] [--rounds 2] [--clients 16]
       [--requests 256|64] [--prompt-tokens 128] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx
from serve_load import add_workload_arguments, drive, start_server, stop_server, workload  # benchmarks/serve_load.py

from phi4.bench import cpu_name
from phi4.demo import BENCHMARK_SHAPES, write_shaped_checkpoint


def start(extra: list[str], threads: int | None, model: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    replicas = int(extra[extra.index("--replicas") + 1]) if "--replicas" in extra else 0

    def every_replica_up(response: httpx.Response) -> bool:  # a fleet's /health is JSON, one process's text
        return not replicas or response.json()["healthy_replicas"] >= replicas

    return start_server(("--max-model-len", "1024", *extra), env, every_replica_up, timeout=300, model=model)


def warm_up(urls: list[str], prompt_tokens: int) -> None:
    """Compile and allocate, on other prompts than the workload's: a fleet's router remembers where it sent
    these and would send them there again, whatever the load."""
    asyncio.run(drive(urls, workload(4 * len(urls), prompt_tokens, seed=1), 4 * len(urls), 4, 60))


def measure(name: str, extra: list[str], threads: int | None, servers: int, prompts: list[list[int]],
            args: argparse.Namespace, round_index: int) -> dict:
    """One arm: `servers` servers started alike (more than one: independent processes, the clients split
    evenly over them), warmed up, then the workload."""
    started = [start(extra, threads, args.model) for _ in range(servers)]
    urls = [url for _, url in started]
    try:
        warm_up(urls, args.prompt_tokens)
        figures = asyncio.run(drive(urls, prompts, args.clients, args.output_tokens, args.max_seconds))
    finally:
        for process, _ in started:
            stop_server(process)
    line = {"arm": name, "round": round_index, **{k: round(v, 2) for k, v in figures.items()}}
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, requests=0)
    parser.add_argument("--shape", choices=["demo", *BENCHMARK_SHAPES], default="demo")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the four arms (alternating order)")
    args = parser.parse_args()
    # Long enough that starting and draining the clients' waves weigh little: the demo serves 64 requests
    # in 3-4 s, a larger shape in a minute or more.
    args.requests = args.requests or (256 if args.shape == "demo" else 64)
    prompts = workload(args.requests, args.prompt_tokens)
    checkpoint = tempfile.TemporaryDirectory()
    args.model = "demo" if args.shape == "demo" else str(write_shaped_checkpoint(Path(checkpoint.name), args.shape))
    # arm -> (what it prints, serve's extra arguments, OMP threads, servers)
    arms = {"one_process": ("one process, 1 thread", [], 1, 1),
            "ray_one": ("Ray Serve, 1 replica", ["--replicas", "1", "--cpus-per-replica", "1"], None, 1),
            "ray_two": ("Ray Serve, 2 replicas", ["--replicas", "2", "--cpus-per-replica", "1"], None, 1),
            "two_processes": ("2 processes, no Ray, 1 thread each", [], 1, 2)}
    tok_s: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index in range(args.rounds):
        for arm in list(arms) if round_index % 2 == 0 else reversed(list(arms)):
            tok_s[arm].append(measure(*arms[arm], prompts, args, round_index)["output_tok_s"])

    def ratio(numerator: str, denominator: str) -> dict[str, float | list[float]]:
        per_round = [a / b for a, b in zip(tok_s[numerator], tok_s[denominator])]
        return {"median": round(statistics.median(per_round), 3), "rounds": [round(r, 3) for r in per_round]}

    print(json.dumps({"figure": "scale_out", "shape": args.shape, "cpu": cpu_name(), "cores": os.cpu_count(),
                      "rounds": args.rounds, "scaling_2_over_1": ratio("ray_two", "ray_one"), "scaling_target": 1.6,
                      "machine_2_over_1": ratio("two_processes", "one_process"),
                      "ceiling_2_over_1": ratio("two_processes", "ray_one"),
                      "ray_two_over_two_processes": ratio("ray_two", "two_processes"),
                      "ray_over_one_process": ratio("ray_one", "one_process"), "overhead_target": 0.85}))


if __name__ == "__main__":
    main()
