"""Scale-out on Ray Serve: the same streaming workload against `phi4 serve --model demo` as one process and
on Ray Serve with 1 and then 2 replicas, every engine limited to one CPU thread, in one run.

Prints one JSON line per arm (output tokens/s, requests/s, TTFT and ITL percentiles, as the clients saw
them) and a summary: the scaling ratio (2 replicas over 1; target >= 1.6 on a 2-core machine) and the
routing overhead (1 replica through Ray over the same single engine in one process; target >= 0.85).
Prefix caching is off and the prompts are random, so routing cannot win by cache hits.

`--shape medium` serves a larger random checkpoint (hidden 768, 6 layers; the demo's tokenizer): a token
then costs its engine ~4 ms of one core instead of ~1 ms, closer to a real model, where the replicas and not
the HTTP and Ray messaging around them are the bottleneck. On the demo, with two single-thread engines on a
2-core machine, the ingress, Ray's proxy and the load generator compete with the engines for the cores.

Usage: python benchmarks/scale_out.py [--shape demo|medium] [--clients 16] [--requests 64] [--prompt-tokens 128]
       [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
from serve_load import add_workload_arguments, drive, start_server, stop_server, workload  # benchmarks/serve_load.py

from phi4.bench import cpu_name
from phi4.demo import write_shaped_checkpoint


def start(extra: list[str], threads: int | None, model: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    replicas = int(extra[extra.index("--replicas") + 1]) if "--replicas" in extra else 0

    def every_replica_up(response: httpx.Response) -> bool:  # a fleet's /health is JSON, one process's text
        return not replicas or response.json()["healthy_replicas"] >= replicas

    return start_server(("--max-model-len", "1024", *extra), env, every_replica_up, timeout=300, model=model)


def measure(name: str, extra: list[str], threads: int | None, prompts: list[list[int]], args: argparse.Namespace
            ) -> dict:
    process, url = start(extra, threads, args.model)
    try:
        asyncio.run(drive(url, prompts[:4], 4, 4, 60))  # warm-up: every replica compiles and allocates
        figures = asyncio.run(drive(url, prompts, args.clients, args.output_tokens, args.max_seconds))
    finally:
        stop_server(process)
    line = {"arm": name, **{k: round(v, 2) for k, v in figures.items()}}
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, requests=64)
    parser.add_argument("--shape", choices=["demo", "medium"], default="demo")
    args = parser.parse_args()
    prompts = workload(args.requests, args.prompt_tokens)
    checkpoint = tempfile.TemporaryDirectory()
    args.model = "demo" if args.shape == "demo" else str(write_shaped_checkpoint(Path(checkpoint.name), args.shape))
    one_process = measure("one process, 1 thread", [], 1, prompts, args)
    ray_one = measure("Ray Serve, 1 replica", ["--replicas", "1", "--cpus-per-replica", "1"], None, prompts, args)
    ray_two = measure("Ray Serve, 2 replicas", ["--replicas", "2", "--cpus-per-replica", "1"], None, prompts, args)
    print(json.dumps({"figure": "scale_out", "shape": args.shape, "cpu": cpu_name(), "cores": os.cpu_count(),
                      "scaling_2_over_1": round(ray_two["output_tok_s"] / ray_one["output_tok_s"], 3),
                      "scaling_target": 1.6,
                      "ray_over_one_process": round(ray_one["output_tok_s"] / one_process["output_tok_s"], 3),
                      "overhead_target": 0.85}))


if __name__ == "__main__":
    main()
