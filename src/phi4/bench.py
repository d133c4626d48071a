"""`phi4 bench`: offline engine throughput and latency for a fixed synthetic workload."""

from __future__ import annotations

import random
import resource
import sys
import time
from typing import Any

import torch

from phi4.llm import LLM
from phi4.sampling_params import SamplingParams


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_offline(
    llm: LLM, prompt_len: int, output_len: int, num_seqs: int, ignore_eos: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Prefill `num_seqs` random prompts together, then decode; figures as a JSON-ready dict."""
    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=ignore_eos)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
    device = llm.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_token: dict[str, float] = {}
    generated = 0
    start = time.perf_counter()
    for output in llm.stream(prompts, params):
        first_token.setdefault(output.request_id, time.perf_counter() - start)
        generated += len(output.new_token_ids)
    elapsed = time.perf_counter() - start
    all_prefilled = max(first_token.values())
    decode_seconds = max(elapsed - all_prefilled, 1e-9)
    decode_total = (generated - num_seqs) / decode_seconds
    return {
        "prompt_len": prompt_len, "output_len": output_len, "num_seqs": num_seqs, "generated_tokens": generated,
        "prefill_tok_s": round(num_seqs * prompt_len / all_prefilled, 1),
        "ttft_ms_mean": round(1000 * sum(first_token.values()) / len(first_token), 2),
        "ttft_ms_max": round(1000 * all_prefilled, 2),
        "decode_tok_s_total": round(decode_total, 1),
        "decode_tok_s_per_seq": round(decode_total / num_seqs, 2),
        "elapsed_s": round(elapsed, 3),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device), "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "batch_invariant": llm.engine.model.batch_invariant,
    }
