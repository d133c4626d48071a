"""How far fp8 weights move the logits: max |Δ| and mean KL(bf16-or-float || fp8) of the next-token
distribution over 100 prompts, and how often the greedy token stays the same. Demo checkpoint; on CPU
the reference is float32, on a GPU bf16.

Usage: python benchmarks/fp8_logit_error.py [--prompts 100] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from phi4 import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    reference = LLM("demo", device=args.device, enable_prefix_caching=False)
    quantized = LLM("demo", device=args.device, enable_prefix_caching=False, quantization="fp8")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 100_000) for _ in range(rng.randint(8, 64))] for _ in range(args.prompts)]
    max_delta, kls, agree = 0.0, [], 0
    for prompt in prompts:
        ref = reference.engine.prompt_logits(prompt)[-1]
        fp8 = quantized.engine.prompt_logits(prompt)[-1]
        max_delta = max(max_delta, float((ref - fp8).abs().max()))
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(fp8, -1)
        kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
        agree += int(ref.argmax() == fp8.argmax())
    print(json.dumps({
        "figure": "fp8_logit_error", "prompts": len(prompts), "max_abs_delta": round(max_delta, 4),
        "logit_range": round(float(ref.abs().max()), 2), "mean_kl": round(statistics.fmean(kls), 5),
        "greedy_agreement": round(agree / len(prompts), 3), "device": str(reference.engine.device),
        "reference_dtype": str(reference.engine.dtype).removeprefix("torch."),
    }))


if __name__ == "__main__":
    main()
