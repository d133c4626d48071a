"""On a CUDA device: the engine runs in bf16 and keeps the reference's greedy tokens (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import PROMPTS
from phi4 import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_bf16_on_cuda_matches_the_reference_greedy_tokens(demo_dir: Path) -> None:
    from transformers import Phi3ForCausalLM

    reference = Phi3ForCausalLM.from_pretrained(demo_dir, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(str(demo_dir), device="cuda")
    assert llm.engine.dtype == torch.bfloat16
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    results = llm.generate(prompts, params)
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert result.token_ids == out[0, len(ids):].tolist()


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_batch_invariance_holds_on_cuda(demo_dir: Path, quantization: str | None) -> None:
    import random

    llm = LLM(str(demo_dir), device="cuda", max_model_len=1024, quantization=quantization)
    rng = random.Random(3)
    target = [rng.randrange(100, 100_000) for _ in range(90)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True, logprobs=1)

    def run(prompts: list[list[int]], index: int) -> tuple:
        result = llm.generate(prompts, [params] * len(prompts))[index]
        return result.token_ids, [e.logprob for e in result.logprobs or []]

    alone = run([target], 0)
    for mix in range(20):
        others = [[rng.randrange(100, 100_000) for _ in range(rng.randint(1, 300))] for _ in range(rng.randint(1, 15))]
        llm.engine.scheduler.max_num_batched_tokens = rng.choice([2048, 37])
        assert run(others + [target], len(others)) == alone, f"mix {mix}"
