"""What batch invariance costs: decode tokens/s with it on and off, same run, at 1 and 16 sequences.

Demo checkpoint; 128-token prompts, 128 new tokens each, greedy. Decode tokens/s counts the tokens after
each request's first and the time after the last request's first token. Prints one JSON line per batch
size with both figures and the cost (1 - on/off). Usage: python benchmarks/batch_invariance_cost.py
[--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from phi4 import LLM, SamplingParams


def decode_tokens_per_second(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    first: dict[str, float] = {}
    for output in llm.stream(prompts, params):
        first.setdefault(output.request_id, time.perf_counter())
    end = time.perf_counter()
    return len(prompts) * (new_tokens - 1) / (end - max(first.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    engines = {
        on: LLM("demo", device=args.device, batch_invariant=on, enable_prefix_caching=False) for on in (True, False)
    }
    rng = random.Random(0)
    for batch in (1, 16):
        prompts = [[rng.randrange(100, 100_000) for _ in range(128)] for _ in range(batch)]
        rates: dict[bool, list[float]] = {True: [], False: []}
        for on, llm in engines.items():
            decode_tokens_per_second(llm, prompts[:1], 4)  # warm-up
        for _ in range(args.repeats):
            for on, llm in engines.items():  # interleaved, so that machine noise hits both alike
                rates[on].append(decode_tokens_per_second(llm, prompts, args.new_tokens))
        on_rate, off_rate = statistics.median(rates[True]), statistics.median(rates[False])
        print(json.dumps({
            "figure": "decode_tok_s_batch_invariance", "sequences": batch, "invariant": round(on_rate, 1),
            "not_invariant": round(off_rate, 1), "cost": round(1 - on_rate / off_rate, 3), "target_cost": 0.15,
            "device": str(engines[True].engine.device), "dtype": str(engines[True].engine.dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        }))


if __name__ == "__main__":
    main()
