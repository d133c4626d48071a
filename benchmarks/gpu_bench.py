"""phi4 against transformers `generate` on a full-size Phi-4-shaped checkpoint, in one run on one GPU.

The weights are random (the same bytes and FLOPs as the real model), drawn once on the GPU in bf16 and
shared by both engines: no download, no 28 GB written to disk. Prints one JSON line per figure and
writes them all to --output:

- hf_decode: transformers generate, batch 1 and 16, 512-token prompts, 256 new tokens;
- phi4 (bf16 on a GPU): batch 1, `--batch` concurrent (64), and prefill of a 2,048-token prompt;
- greedy_vs_reference: phi4's greedy tokens against its torch reference attention backend, 128 tokens;
- phi4 fp8: batch 1, and the logit error against bf16 (max |d| and mean KL over 100 prompts).

A phase that fails is reported as a figure with its error and the others still run; --output is
rewritten after every figure, so a run cut short keeps what it measured.

`--quick` measures each phi4 figure once, keeping the whole run under 6 minutes on an H100; without it each
is the median of three runs. --output defaults to benchmarks/results/gpu_bench_<device name>.json.
`--shape demo --device cpu` runs the same code on the demo shape, as the test suite does. Usage:
    python benchmarks/gpu_bench.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import re
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from phi4 import LLM, SamplingParams
from phi4.bench import logit_error, run_offline
from phi4.demo import demo_config, random_phi3_weights, reference_config, write_checkpoint
from phi4.engine.runner import kv_bytes_per_block
from phi4.config import ModelConfig

TARGETS = {"phi4_bf16_batch1_tok_s": 85, "phi4_fp8_batch1_tok_s": 150, "phi4_bf16_batch64_tok_s": 4000,
           "phi4_prefill_2048_tok_s": 20000}


class Report:
    """JSON lines on stdout and in --output, rewritten after every figure: a run cut short keeps what it had."""

    def __init__(self, output: Path | None) -> None:
        self.figures: list[dict[str, Any]] = []
        self.output = output
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, figure: dict[str, Any]) -> None:
        self.figures.append(figure)
        print(json.dumps(figure), flush=True)
        if self.output is not None:
            self.output.write_text("\n".join(json.dumps(f) for f in self.figures) + "\n")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A failing phase is reported as a figure with its error; the others still run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - device time is scarce: report and go on
            traceback.print_exc()
            self.emit({"figure": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_decode(model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int, vocab: int,
              device: torch.device) -> dict[str, Any]:
    """Output tokens/s of `generate` for a batch of equal-length prompts, prefill timed apart."""
    rng = random.Random(batch)
    ids = torch.tensor([[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)], device=device)
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}

    def timed(tokens: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(new_tokens)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "decode_tok_s_total": round(batch * (new_tokens - 1) / (total - prefill), 1),
            "decode_tok_s_per_seq": round((new_tokens - 1) / (total - prefill), 2)}


def greedy(llm: LLM, prompt: list[int], tokens: int) -> list[int]:
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the standard sizes, under 6 minutes on an H100")
    parser.add_argument("--shape", choices=["phi-4", "demo"], default="phi-4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--greedy-tokens", type=int, default=128)
    parser.add_argument("--logit-prompts", type=int, default=100)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = reference_config("phi-4") if args.shape == "phi-4" else demo_config()
    report = Report(args.output)
    emit = report.emit
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.output is None:
        slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
        args.output = Path(__file__).resolve().parent / "results" / f"gpu_bench_{slug}.json"
    run_info = {"device": device_name, "torch": torch.__version__, "shape": args.shape,
                "dtype": str(dtype).removeprefix("torch.")}
    repeats = 1 if args.quick else 3

    def measured(prompt_len: int, new_tokens: int, num_seqs: int) -> dict:
        """One phi4 figure: the run with the median decode speed of `repeats` runs."""
        runs = [run_offline(llm, prompt_len, new_tokens, num_seqs) for _ in range(repeats)]
        return sorted(runs, key=lambda r: r["decode_tok_s_total"])[len(runs) // 2]
    emit({"figure": "run", **run_info})

    start = time.perf_counter()
    weights = random_phi3_weights(config, seed=0, device=device, dtype=dtype)
    emit({"figure": "weights_drawn", "seconds": round(time.perf_counter() - start, 1),
          "parameters": sum(t.numel() for t in weights.values())})
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory)
        write_checkpoint(checkpoint, config, {}, dtype=dtype)  # config and tokenizer; the weights stay in memory
        (checkpoint / "model.safetensors").unlink(missing_ok=True)
        model_config = ModelConfig.from_dir(checkpoint)
        vocab = model_config.vocab_size
        longest = max(args.batch * (args.prompt_len + args.new_tokens), args.prefill_len + 16)
        blocks = -(-longest // 16) + 64
        options = {"device": args.device, "weights": weights, "num_kv_blocks": blocks, "enable_prefix_caching": False,
                   "max_model_len": max(args.prompt_len + args.new_tokens, args.prefill_len) + 16,
                   "max_num_seqs": max(256, args.batch), "max_num_batched_tokens": max(2048, args.prefill_len)}
        one_sequence = {**options, "num_kv_blocks": -(-options["max_model_len"] // 16) + 16}
        emit({"figure": "kv_cache", "blocks": blocks, "bytes": blocks * kv_bytes_per_block(model_config, 16, dtype)})
        rng = random.Random(5)
        prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
        logit_prompts = [[rng.randrange(vocab) for _ in range(rng.randint(8, 64))] for _ in range(args.logit_prompts)]

        # phi4 first, transformers last: its anchors are known (DESIGN.md) if the run is cut short.
        llm = None
        with report.phase("phi4"):
            llm = LLM(str(checkpoint), **options)
            emit({"figure": "phi4", **measured(args.prompt_len, args.new_tokens, 1)})
            emit({"figure": "phi4", **measured(args.prompt_len, args.new_tokens, args.batch)})
            emit({"figure": "phi4_prefill", **measured(args.prefill_len, 1, 1)})
        with report.phase("greedy_vs_reference"):
            assert llm is not None, "phi4 did not start"
            fast = greedy(llm, prompt, args.greedy_tokens)
            reference = LLM(str(checkpoint), **{**one_sequence, "attention_backend": "torch"})
            slow = greedy(reference, prompt, args.greedy_tokens)
            agreed = next((i for i, (a, b) in enumerate(zip(fast, slow)) if a != b), len(fast))
            emit({"figure": "greedy_vs_reference", "tokens": args.greedy_tokens, "equal_prefix": agreed,
                  "equal": fast == slow})
            del reference
        free(device)
        if not args.skip_fp8:
            with report.phase("phi4_fp8"):
                quantized = LLM(str(checkpoint), **{**one_sequence, "quantization": "fp8"})
                emit({"figure": "phi4_fp8", **run_offline(quantized, args.prompt_len, args.new_tokens, 1)})
                assert llm is not None, "phi4 did not start"
                emit({"figure": "fp8_logit_error", **logit_error(llm, quantized, logit_prompts)})
                del quantized
            free(device)
        if not args.skip_hf:
            with report.phase("hf_decode"):
                hf = shared_hf_model(checkpoint, weights, device)
                for batch in (1, args.hf_batch):
                    emit({"figure": "hf_decode", **hf_decode(hf, batch, args.prompt_len, args.new_tokens, vocab,
                                                             device)})
                del hf
            free(device)

    by_name = {(f["figure"], f.get("num_seqs"), f.get("prompt_len")): f for f in report.figures}
    summary = {
        "phi4_bf16_batch1_tok_s": by_name.get(("phi4", 1, args.prompt_len), {}).get("decode_tok_s_total"),
        "phi4_bf16_batch64_tok_s": by_name.get(("phi4", args.batch, args.prompt_len), {}).get("decode_tok_s_total"),
        "phi4_prefill_2048_tok_s": by_name.get(("phi4_prefill", 1, args.prefill_len), {}).get("prefill_tok_s"),
        "phi4_fp8_batch1_tok_s": by_name.get(("phi4_fp8", 1, args.prompt_len), {}).get("decode_tok_s_total"),
    }
    emit({"figure": "summary", **run_info, **summary, "targets": TARGETS if args.shape == "phi-4" else None})


def shared_hf_model(checkpoint: Path, weights: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """transformers' Phi3ForCausalLM over the very tensors phi4 uses: no second copy of the weights."""
    from transformers import Phi3Config, Phi3ForCausalLM

    hf_config = Phi3Config.from_pretrained(checkpoint)
    with torch.device("meta"):
        hf = Phi3ForCausalLM(hf_config)
    hf.load_state_dict(weights, assign=True, strict=False)
    with torch.device(device):  # its buffers, not weights: build them for real
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)
    left_on_meta = [name for name, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not left_on_meta, f"transformers' model kept tensors on the meta device: {left_on_meta}"
    if hf_config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


if __name__ == "__main__":
    main()
