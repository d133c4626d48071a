"""phi4 against the reference implementation (transformers' Phi3ForCausalLM), float32 on CPU.

Two checkpoints: the demo (Phi-4 scaled down) and Phi-4-mini scaled down (partial rotary, LongRoPE with
sequences crossing the original context, tied embeddings). Every way the engine can run a request —
alone, batched with others, prefilled in chunks, from the prefix cache, preempted and resumed — must give
the reference's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, load_reference, reference_greedy
from phi4 import LLM, SamplingParams

NEW_TOKENS = 64
EXTRA_PROMPTS = [
    "Hi",
    "Les sanglots longs des violons de l'automne blessent mon coeur d'une langueur monotone. " * 3,
    "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "Привет, мир! Как дела?",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["demo", "mini"])
def case(request: pytest.FixtureRequest) -> dict:
    directory: Path = request.getfixturevalue("demo_dir" if request.param == "demo" else "mini_dir")
    reference = load_reference(directory)
    llm = LLM(str(directory), device="cpu", dtype="float32")
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS + EXTRA_PROMPTS]
    if request.param == "mini":
        # Longer than the scaled original context (64): the whole prompt uses LongRoPE's long factors.
        assert len(prompts[5]) > 64 and all(len(p) + NEW_TOKENS > 64 for p in prompts)
    expected = [reference_greedy(reference, ids, NEW_TOKENS) for ids in prompts]
    return {"name": request.param, "dir": directory, "reference": reference, "llm": llm,
            "prompts": prompts, "expected": expected}


def test_prefill_logits_match_reference(case: dict) -> None:
    fresh = LLM(str(case["dir"]), device="cpu", dtype="float32")
    for ids in case["prompts"]:
        with torch.no_grad():
            expected = case["reference"](torch.tensor([ids])).logits[0].float()
        actual = fresh.engine.prompt_logits(ids)
        relative = (actual - expected).abs().max() / expected.abs().max()
        assert relative < 1e-4, f"{case['name']}: prompt of {len(ids)} tokens differs by {relative:.2e} (relative)"


def test_greedy_tokens_match_reference_one_request_at_a_time(case: dict) -> None:
    for ids, expected in list(zip(case["prompts"], case["expected"]))[:4]:
        result = case["llm"].generate([ids], GREEDY)[0]
        assert result.token_ids == expected
        assert result.finish_reason == "length"


def _generate_all(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Run all prompts at once; also return how many sequences each engine step carried."""
    batch_sizes: list[int] = []
    scheduler = llm.engine.scheduler
    original = scheduler.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        scheduled = original()
        batch_sizes.append(len(scheduled))
        return scheduled

    scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    try:
        results = llm.generate(prompts, GREEDY)
    finally:
        del scheduler.schedule
    return [r.token_ids for r in results], batch_sizes


def test_concurrent_requests_of_different_lengths_match_reference(case: dict) -> None:
    tokens, batch_sizes = _generate_all(case["llm"], case["prompts"])
    assert max(batch_sizes) == len(case["prompts"]), "all 8 requests should share engine steps"
    assert tokens == case["expected"]


def test_chunked_prefill_matches_reference(case: dict) -> None:
    llm = LLM(str(case["dir"]), device="cpu", dtype="float32", max_num_batched_tokens=7, enable_prefix_caching=False)
    tokens, batch_sizes = _generate_all(llm, case["prompts"])
    # With a budget of 7 tokens a step, every prompt longer than 7 is prefilled over several steps.
    assert sum(batch_sizes) > len(case["prompts"]) * NEW_TOKENS
    assert tokens == case["expected"]


def test_prefix_cache_reuse_matches_reference(case: dict) -> None:
    llm = LLM(str(case["dir"]), device="cpu", dtype="float32")
    first, _ = _generate_all(llm, case["prompts"])
    assert llm.engine.block_manager.prefix_hit_tokens == 0
    second, _ = _generate_all(llm, case["prompts"])
    assert llm.engine.block_manager.prefix_hit_tokens >= 16, "the second run should reuse cached prompt blocks"
    assert first == second == case["expected"]


def test_preemption_under_a_small_kv_cache_matches_reference(case: dict) -> None:
    # 16 blocks of 16 tokens cannot hold 8 sequences of up to ~170 tokens: requests get preempted.
    llm = LLM(str(case["dir"]), device="cpu", dtype="float32", num_kv_blocks=16, max_model_len=256)
    tokens, _ = _generate_all(llm, case["prompts"])
    assert llm.engine.num_preemptions > 0
    assert tokens == case["expected"]
    assert llm.engine.block_manager.num_free_blocks == 16, "every block comes back when all requests finish"
