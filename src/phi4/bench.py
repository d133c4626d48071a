"""`phi4 bench`: offline engine throughput and latency for a fixed synthetic workload."""

from __future__ import annotations

import platform
import random
import resource
import statistics
import sys
import time
from typing import Any

import torch

from phi4.llm import LLM
from phi4.sampling_params import SamplingParams


def cpu_name() -> str:
    """The CPU's model name (`lscpu`'s), which every CPU figure names: Intel and AMD differ."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    # Warm-up at the full batch, on other prompts (no prefix-cache help for the timed run): kernels compile
    # and CUDA graphs for every batch bucket are captured here, outside the timing window.
    warm_up = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_seqs)]
    llm.generate(warm_up, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
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


def logit_error(reference: LLM, quantized: LLM, prompts: list[list[int]]) -> dict[str, Any]:
    """How far `quantized` moves the next-token logits of `reference` over `prompts`: max |Δ|, mean
    KL(reference || quantized) and how often the greedy token stays the same."""
    max_delta, kls, agree, logit_range = 0.0, [], 0, 0.0
    for prompt in prompts:
        ref = reference.engine.prompt_logits(prompt)[-1].float()
        low = quantized.engine.prompt_logits(prompt)[-1].float()
        max_delta = max(max_delta, float((ref - low).abs().max()))
        logit_range = max(logit_range, float(ref.abs().max()))
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(low, -1)
        kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
        agree += int(ref.argmax() == low.argmax())
    return {"prompts": len(prompts), "max_abs_delta": round(max_delta, 4), "logit_range": round(logit_range, 2),
            "mean_kl": round(statistics.fmean(kls), 6), "greedy_agreement": round(agree / len(prompts), 3)}
