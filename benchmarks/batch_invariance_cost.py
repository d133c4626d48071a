"""What batch invariance costs: decode tokens/s with it on and off, same run, at 1 and 16 sequences.

Demo checkpoint; 128-token prompts, 128 new tokens each, greedy. Decode tokens/s counts the tokens after
each request's first and the time after the last request's first token. Prints one JSON line per batch
size with both figures and the cost (1 - on/off). Usage: python benchmarks/batch_invariance_cost.py
[--repeats 3] [--device cpu] [--shape demo|wide]

On CUDA the two differ (Triton's fixed tiles against cuBLAS). On CPU phi4's kernels are batch-invariant by
construction and its fastest, so the flag changes nothing there and the cost should read about 0.
`--shape wide` (hidden 1024, 32 layers, random weights written to a temporary directory; the head is 17%
of the weights against the demo's 47%) shows the cost nearer the real model's proportions; use
`--prompt-len 32 --new-tokens 32` there to keep the run short.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from phi4 import LLM, SamplingParams
from phi4.demo import demo_config, random_phi3_weights, write_checkpoint

WIDE_SHAPE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 16,
              "num_key_value_heads": 4}


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
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--shape", choices=["demo", "wide"], default="demo")
    args = parser.parse_args()
    directory = tempfile.TemporaryDirectory()
    model = "demo"
    if args.shape == "wide":
        config = {**demo_config(), **WIDE_SHAPE, "_name_or_path": "phi4-wide-random"}
        write_checkpoint(Path(directory.name), config, random_phi3_weights(config))
        model = directory.name
    engines = {
        on: LLM(model, device=args.device, batch_invariant=on, enable_prefix_caching=False) for on in (True, False)
    }
    rng = random.Random(0)
    for batch in (1, 16):
        prompts = [[rng.randrange(100, 100_000) for _ in range(args.prompt_len)] for _ in range(batch)]
        rates: dict[bool, list[float]] = {True: [], False: []}
        for on, llm in engines.items():
            decode_tokens_per_second(llm, prompts[:1], 4)  # warm-up
        for repeat in range(args.repeats):
            # interleaved, each first in turn, so that machine noise and cache warmth hit both alike
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                rates[on].append(decode_tokens_per_second(engines[on], prompts, args.new_tokens))
        on_rate, off_rate = statistics.median(rates[True]), statistics.median(rates[False])
        print(json.dumps({
            "figure": "decode_tok_s_batch_invariance", "sequences": batch, "invariant": round(on_rate, 1),
            "not_invariant": round(off_rate, 1), "cost": round(1 - on_rate / off_rate, 3), "target_cost": 0.15,
            "shape": args.shape,
            "device": str(engines[True].engine.device), "dtype": str(engines[True].engine.dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        }))


if __name__ == "__main__":
    main()
