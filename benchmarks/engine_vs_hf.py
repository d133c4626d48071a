"""phi4's engine against transformers `generate` on the demo checkpoint (CPU, float32), in one run.

(a) one sequence, 128-token prompt, 128 new tokens: decode tokens/s of each;
(b) 16 requests, prompt lengths over 16-512 and output lengths over 16-256 (fixed seed): useful output
    tokens/s of phi4 taking all 16 at once against transformers generating them as one left-padded batch
    (which runs every row to the longest output; only each request's own tokens count as useful);
(c) prefill: prompt tokens/s to the first token of one 128-, 512- and 2000-token prompt (target at 512:
    phi4 >= 0.9x transformers).

Prints one JSON line per figure with phi4's value, the baseline's and the ratio, plus phi4's overhead per
step (time outside the model's forward and LM head) and the CPU it ran on. On CPU phi4's kernels are
batch-invariant by construction and its fastest, so there is one phi4 arm. transformers reads the bf16
checkpoint widened to float32 (as it loads it on CPU); phi4 reads it as stored. Usage:
python benchmarks/engine_vs_hf.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from phi4 import LLM, SamplingParams
from phi4.bench import cpu_name
from phi4.demo import demo_checkpoint_path

TARGET_RATIO = 1.6  # decode
PREFILL_TARGET_RATIO = 0.9  # at a 512-token prompt


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 100_000) for _ in range(length)]


def hf_generate_seconds(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(total seconds, prefill seconds) of a left-padded greedy batch that generates exactly `new_tokens`."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return total, prefill


class ModelTimer:
    """Times the model's forward and LM head, so that the rest of a step is the engine's own overhead."""

    def __init__(self, llm: LLM) -> None:
        self.model_seconds = 0.0
        self.steps = 0
        model = llm.engine.model
        for name in ("forward", "compute_logits"):
            setattr(model, name, self._timed(getattr(model, name), counts_step=name == "forward"))

    def _timed(self, fn, counts_step: bool):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.model_seconds += time.perf_counter() - start
                self.steps += counts_step

        return timed

    def reset(self) -> None:
        self.model_seconds, self.steps = 0.0, 0

    def overhead_ms_per_step(self, total_seconds: float) -> float:
        return 1000 * (total_seconds - self.model_seconds) / max(self.steps, 1)


def phi4_run(llm: LLM, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, float]:
    """(seconds to finish all, seconds to the first token of the last request)."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    first_token: dict[str, float] = {}
    for output in llm.stream(prompts, params):
        first_token.setdefault(output.request_id, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    return elapsed, max(first_token.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are printed")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import Phi3ForCausalLM

    directory = demo_checkpoint_path()
    hf = Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    # Prefix caching off: repeated runs of the same prompts must not be served from the cache.
    llm = LLM(str(directory), device="cpu", enable_prefix_caching=False)
    timer = ModelTimer(llm)
    rng = random.Random(0)
    env = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}

    # (a) one sequence: decode tokens/s = new tokens after the first / time after the first token.
    prompt = random_prompt(rng, 128)
    new = 128
    decode: dict[str, list[float]] = {"phi4": [], "transformers": []}
    overhead: list[float] = []
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    hf_generate_seconds(hf, [prompt], 4)
    for _ in range(args.repeats):
        timer.reset()
        total, ttft = phi4_run(llm, [prompt], [new])
        decode["phi4"].append((new - 1) / (total - ttft))
        overhead.append(timer.overhead_ms_per_step(total))
        hf_total, hf_prefill = hf_generate_seconds(hf, [prompt], new)
        decode["transformers"].append((new - 1) / (hf_total - hf_prefill))
    report("single_sequence_decode_tok_s", decode, overhead, {"prompt": 128, "new_tokens": new, **env})

    # (b) 16 mixed requests: useful output tokens/s.
    prompt_lens = [rng.randint(16, 512) for _ in range(16)]
    out_lens = [rng.randint(16, 256) for _ in range(16)]
    prompts = [random_prompt(rng, n) for n in prompt_lens]
    useful = sum(out_lens)
    rates: dict[str, list[float]] = {"phi4": [], "transformers": []}
    overhead = []
    for _ in range(args.repeats):
        timer.reset()
        total, _ = phi4_run(llm, prompts, out_lens)
        rates["phi4"].append(useful / total)
        overhead.append(timer.overhead_ms_per_step(total))
        hf_total, _ = hf_generate_seconds(hf, prompts, max(out_lens))
        rates["transformers"].append(useful / hf_total)
    report("batch16_useful_output_tok_s", rates, overhead,
           {"requests": 16, "prompt_lens": [16, 512], "output_lens": [16, 256], "useful_tokens": useful, **env})

    # (c) prefill: prompt tokens / time to the first token, one prompt at a time.
    for length in (128, 512, 2000):
        prompt = random_prompt(rng, length)
        speeds: dict[str, list[float]] = {"phi4": [], "transformers": []}
        overhead = []
        for _ in range(args.repeats):
            timer.reset()
            total, _ = phi4_run(llm, [prompt], [1])
            speeds["phi4"].append(length / total)
            overhead.append(timer.overhead_ms_per_step(total))
            speeds["transformers"].append(length / hf_generate_seconds(hf, [prompt], 1)[1])
        report("prefill_tok_s", speeds, overhead, {"prompt": length, **env}, target=PREFILL_TARGET_RATIO)


def report(figure: str, values: dict[str, list[float]], overhead: list[float], extra: dict,
           target: float = TARGET_RATIO) -> None:
    medians = {name: statistics.median(v) for name, v in values.items()}
    baseline = medians["transformers"]
    print(json.dumps({
        "figure": figure, "phi4": round(medians["phi4"], 1), "transformers": round(baseline, 1),
        "ratio": round(medians["phi4"] / baseline, 2), "target_ratio": target,
        "phi4_overhead_ms_per_step": round(statistics.median(overhead), 3), **extra,
    }))


if __name__ == "__main__":
    main()
