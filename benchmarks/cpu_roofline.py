"""Decode on CPU against the memory-bandwidth limit, measured in the same run.

A decode step reads every weight once, so no engine can step faster than this machine streams the
weights' bytes. This script measures that rate (a streaming read, `torch.sum` over a float32 buffer of the
same number of bytes, best of 20), then the decode step time of phi4 (weights read in their stored
bfloat16, 1 and 16 sequences) and of transformers (float32, as it loads a bf16 checkpoint on CPU), and
reports each as the fraction of its step that reading its weights would take at that rate:
`fraction = bytes read / bandwidth / step time` (1.0 = at the limit).

Shapes: `demo` (58 MB of bf16 weights: on many servers that stays in the last-level cache, so the "memory"
rate here is the cache's), and `large` (hidden 1536, 12 layers, about 0.9 GB of bf16 weights: well past any
cache, so the rate is DRAM's).

`--llama-cpp SOURCE` adds llama.cpp as a third arm (see llama_cpp_arm.py: the same checkpoint converted
by llama.cpp's own converter to bf16, decoded with the same threads) and prints phi4's speed over it.

Usage: python benchmarks/cpu_roofline.py [--shape demo|medium|large] [--repeats 3] [--llama-cpp SOURCE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from phi4 import LLM, SamplingParams
from phi4.bench import cpu_name
from phi4.demo import BENCHMARK_SHAPES, random_phi3_weights, shaped_config, write_checkpoint
from phi4.model.cpu_kernels import empty_on_huge_pages


def stream_seconds(num_bytes: int) -> float:
    """Best time to read `num_bytes` once (a sum over a float32 buffer of that size), over 20 reads. The buffer
    sits on 2 MB pages where Linux gives them, as phi4's packed weights do (cpu_kernels.empty_on_huge_pages)."""
    buffer = empty_on_huge_pages((num_bytes // 4,), torch.float32).fill_(1.0)
    buffer.sum()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return min(times)


def phi4_step_ms(llm: LLM, sequences: int, prompt_len: int, steps: int) -> float:
    """Median time of a decode step with `sequences` running (prompts prefilled beforehand)."""
    engine = llm.engine
    rng = random.Random(sequences)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    ids = [engine.add_request([rng.randrange(100, 100_000) for _ in range(prompt_len)], params)
           for _ in range(sequences)]
    scheduler = engine.scheduler
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in [*scheduler.running, *scheduler.waiting]):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort_request(request_id)
    return 1000 * statistics.median(times)


def hf_step_ms(model: torch.nn.Module, sequences: int, prompt_len: int, steps: int) -> float:
    """transformers generate: (time for prompt + steps tokens - time for prompt + 1 token) / (steps - 1)."""
    rng = random.Random(sequences)
    input_ids = torch.tensor([[rng.randrange(100, 100_000) for _ in range(prompt_len)] for _ in range(sequences)])
    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        return time.perf_counter() - start

    return 1000 * (timed(steps) - timed(1)) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["demo", *BENCHMARK_SHAPES], default="demo")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each figure; medians are printed")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="SOURCE",
                        help="a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/): add llama.cpp as an arm")
    args = parser.parse_args()
    from transformers import Phi3Config, Phi3ForCausalLM

    config = shaped_config(args.shape)
    steps = args.steps or (64 if args.shape == "demo" else 8)
    directory = tempfile.TemporaryDirectory()
    weights = {name: t.bfloat16() for name, t in random_phi3_weights(config).items()}  # stored as Phi-4 ships
    write_checkpoint(Path(directory.name), config, weights)
    phi4 = LLM(directory.name, enable_prefix_caching=False, max_model_len=1024)
    hf = Phi3ForCausalLM(Phi3Config(**{k: v for k, v in config.items() if not k.startswith("_")}))
    hf.load_state_dict({name: t.float() for name, t in weights.items()})
    hf.eval()
    del weights
    arms: dict[str, Callable[[int, int, int], float]] = {
        "phi4": lambda sequences, prompt, steps: phi4_step_ms(phi4, sequences, prompt, steps),
        "transformers": lambda sequences, prompt, steps: hf_step_ms(hf, sequences, prompt, steps)}
    if args.llama_cpp is not None:
        from llama_cpp_arm import LlamaCppDecoder, convert_to_gguf  # benchmarks/llama_cpp_arm.py

        gguf = convert_to_gguf(Path(directory.name), args.llama_cpp, Path(directory.name) / "model-bf16.gguf")
        llama = LlamaCppDecoder(gguf, threads=torch.get_num_threads())
        arms["llama.cpp"] = llama.step_ms

    phi4_bytes = phi4.engine.model.decode_weight_bytes()
    hf_bytes = sum(p.numel() * p.element_size() for name, p in hf.named_parameters() if "embed_tokens" not in name)
    bandwidth = phi4_bytes / stream_seconds(phi4_bytes)
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": args.shape}
    print(json.dumps({"figure": "stream_read", "bytes": phi4_bytes, "GB_s": round(bandwidth / 1e9, 1), **env}))
    read_bytes = {"phi4": phi4_bytes, "transformers": hf_bytes, "llama.cpp": phi4_bytes}  # llama.cpp: the same bf16
    for sequences in (1, 16):
        measured: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):  # interleaved, so that machine noise hits every arm alike
            for name, step_ms in arms.items():
                measured[name].append(step_ms(sequences, 128, steps))
        figure: dict[str, Any] = {"figure": "decode_step_vs_bandwidth", "sequences": sequences}
        for name in arms:
            num_bytes = read_bytes[name]
            step = statistics.median(measured[name])
            floor = 1000 * num_bytes / bandwidth
            figure[name] = {"weight_bytes": num_bytes, "read_ms": round(floor, 3), "step_ms": round(step, 3),
                            "fraction_of_limit": round(floor / step, 3),
                            "tok_s": round(1000 * sequences / step, 1)}
        figure["phi4_speedup"] = round(figure["transformers"]["step_ms"] / figure["phi4"]["step_ms"], 2)
        if "llama.cpp" in arms:  # the targets: >= 0.85 at one sequence, > 1 at 16
            figure["phi4_over_llama_cpp"] = round(figure["llama.cpp"]["step_ms"] / figure["phi4"]["step_ms"], 3)
        figure["target_fraction_batch1"] = 0.85
        print(json.dumps({**figure, **env}), flush=True)


if __name__ == "__main__":
    main()
