"""Load on `phi4 serve --model demo` from N concurrent streaming clients, on loopback only.

Prints one JSON line: requests/s, output tokens/s, TTFT and inter-token latency p50/p99 as the clients
saw them, and the server's overhead: output tokens/s through HTTP divided by offline `LLM.generate`
tokens/s for the same workload, measured in the same run (offline first, so the two never compete for
the CPU). Bounded: `--requests` in all, and the run stops after `--max-seconds`.

The clients share the machine with the server, so they are kept lean: raw HTTP/1.1 over asyncio streams,
each read timestamped and its server-sent events counted, the JSON parsed only for the final usage (an
httpx client parsing every event took a fifth of a core here, time the server's kernels then lacked).

Usage: python benchmarks/serve_load.py [--clients 16] [--requests 32] [--prompt-tokens 128] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from phi4 import LLM, SamplingParams

MODEL = "microsoft/phi-4"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def workload(requests: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 100_000) for _ in range(prompt_tokens)] for _ in range(requests)]


def offline_tokens_per_second(prompts: list[list[int]], output_tokens: int, concurrency: int) -> float:
    """The same requests through `LLM.generate`, at most `concurrency` at a time, as the clients send them."""
    llm = LLM("demo", enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up
    start = time.perf_counter()
    tokens = 0
    for wave in range(0, len(prompts), concurrency):
        tokens += sum(len(r.token_ids) for r in llm.generate(prompts[wave : wave + concurrency], params))
    return tokens / (time.perf_counter() - start)


TEXT_EVENT = b'"finish_reason": null'  # every streamed piece of text but the last
USAGE = re.compile(rb'"completion_tokens": (\d+)')


async def one_request(url: str, prompt: list[int], output_tokens: int) -> dict:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    address = httpx.URL(url)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    arrivals: list[float] = []
    received = bytearray()
    while data := await reader.read(1 << 16):
        now = time.perf_counter()
        # count events in what arrived, markers split across reads included
        seen = received[-len(TEXT_EVENT) :].count(TEXT_EVENT)
        received += data
        arrivals += [now] * (received[-len(data) - len(TEXT_EVENT) :].count(TEXT_EVENT) - seen)
    writer.close()
    if not received.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(bytes(received[:200]).decode(errors="replace"))
    usage = USAGE.search(received)
    return {"ttft": arrivals[0] - start if arrivals else float("nan"),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": int(usage.group(1)) if usage else 0}


async def drive(url: str | list[str], prompts: list[list[int]], clients: int, output_tokens: int, max_seconds: float
                ) -> dict:
    """`clients` closed-loop clients take the prompts in turn; with several servers' URLs, client i sends to
    server i mod N (each server gets an equal share of the clients)."""
    urls = [url] if isinstance(url, str) else url
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[dict] = []
    deadline = time.perf_counter() + max_seconds

    async def client_loop(target: str) -> None:
        while not queue.empty() and time.perf_counter() < deadline:
            results.append(await one_request(target, queue.get_nowait(), output_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(urls[i % len(urls)]) for i in range(clients)))
    elapsed = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    return {"requests": len(results), "seconds": elapsed, "requests_per_s": len(results) / elapsed,
            "output_tok_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_p50_ms": 1000 * percentile([r["ttft"] for r in results], 0.5),
            "ttft_p99_ms": 1000 * percentile([r["ttft"] for r in results], 0.99),
            "itl_p50_ms": 1000 * percentile(itl, 0.5), "itl_p99_ms": 1000 * percentile(itl, 0.99),
            "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else float("nan")}


def start_server(extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 ready: Callable[[httpx.Response], bool] = lambda response: True,
                 timeout: float = 180, model: str = "demo") -> tuple[subprocess.Popen, str]:
    """`phi4 serve --model MODEL --no-prefix-caching` on a free loopback port, once /health answers 200 and
    `ready` accepts its answer; the server leads a process group of its own (see `stop_server`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "phi4.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
         "--no-prefix-caching", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or os.environ.copy(), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200 and ready(response):
                return process, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    stop_server(process)
    raise TimeoutError(f"phi4 serve {' '.join(extra_args)} did not become healthy")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server, then nothing left of its process group (Ray's workers, with --replicas)."""
    process.terminate()
    try:
        process.wait(timeout=90)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def add_workload_arguments(parser: argparse.ArgumentParser, requests: int) -> None:
    """The streaming workload's options, shared with scale_out.py."""
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, requests=32)
    args = parser.parse_args()
    prompts = workload(args.requests, args.prompt_tokens)
    offline = offline_tokens_per_second(prompts, args.output_tokens, args.clients)
    process, url = start_server()
    try:
        asyncio.run(drive(url, prompts[:2], 2, 4, 60))  # warm-up
        figures = asyncio.run(drive(url, prompts, args.clients, args.output_tokens, args.max_seconds))
    finally:
        stop_server(process)
    print(json.dumps({"figure": "serve_load", "clients": args.clients, "prompt_tokens": args.prompt_tokens,
                      "output_tokens": args.output_tokens, **{k: round(v, 2) for k, v in figures.items()},
                      "offline_output_tok_s": round(offline, 2),
                      "http_over_offline": round(figures["output_tok_s"] / offline, 3), "target": 0.8}))


if __name__ == "__main__":
    main()
