"""How far fp8 weights move the logits: max |Δ| and mean KL(bf16-or-float || fp8) of the next-token
distribution over 100 prompts, and how often the greedy token stays the same. Demo checkpoint; on CPU
the reference is float32, on a GPU bf16.

Usage: python benchmarks/fp8_logit_error.py [--prompts 100] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import random


from phi4 import LLM
from phi4.bench import logit_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    reference = LLM("demo", device=args.device, enable_prefix_caching=False)
    quantized = LLM("demo", device=args.device, enable_prefix_caching=False, quantization="fp8")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 100_000) for _ in range(rng.randint(8, 64))] for _ in range(args.prompts)]
    print(json.dumps({
        "figure": "fp8_logit_error", **logit_error(reference, quantized, prompts),
        "device": str(reference.engine.device), "reference_dtype": str(reference.engine.dtype).removeprefix("torch."),
    }))


if __name__ == "__main__":
    main()
