"""Batch invariance: a request's tokens and log-probabilities are bitwise the same alone or among 15
others of different lengths, prefilled whole or in chunks, with its prefix from the cache or not, and
when preempted and resumed."""

from __future__ import annotations

import random

import pytest

from phi4 import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=2024, max_tokens=24, ignore_eos=True, logprobs=2)


def _result(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], index: int) -> tuple:
    result = llm.generate(prompts, params)[index]
    return result.token_ids, [(e.token_id, e.logprob, e.top) for e in result.logprobs or []]


@pytest.fixture(scope="module")
def llm(demo_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM("demo", max_model_len=1024)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["temperature0", "seeded_temperature1_top_p0.9"])
def test_tokens_and_logprobs_do_not_depend_on_the_batch(llm: LLM, params: SamplingParams) -> None:
    rng = random.Random(hash(params.temperature))
    targets = [[rng.randrange(100, 100_000) for _ in range(n)] for n in (3, 61, 200)]
    alone = {i: _result(llm, [t], [params], 0) for i, t in enumerate(targets)}
    scheduler = llm.engine.scheduler
    hits_before = llm.engine.block_manager.prefix_hit_tokens
    for mix in range(20):
        target = mix % len(targets)
        others = [[rng.randrange(100, 100_000) for _ in range(rng.randint(1, 300))] for _ in range(rng.randint(1, 15))]
        other_params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.8]),
                                       max_tokens=rng.randint(1, 40), ignore_eos=True, seed=rng.randrange(1000))
                        for _ in others]
        position = rng.randint(0, len(others))
        prompts = others[:position] + [targets[target]] + others[position:]
        all_params = other_params[:position] + [params] + other_params[position:]
        # Alternate whole prefills with small chunks that split prompts across steps.
        scheduler.max_num_batched_tokens = rng.choice([2048, 37, 128])
        try:
            assert _result(llm, prompts, all_params, position) == alone[target], f"mix {mix}"
        finally:
            scheduler.max_num_batched_tokens = 2048
    assert llm.engine.block_manager.prefix_hit_tokens > hits_before, "some targets were served from the cache"


def test_preemption_and_resumption_do_not_change_a_request(demo_dir) -> None:  # type: ignore[no-untyped-def]
    roomy = LLM("demo", max_model_len=256)
    cramped = LLM("demo", max_model_len=256, num_kv_blocks=16)
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 100_000) for _ in range(rng.randint(20, 120))] for _ in range(8)]
    params = [SEEDED if i % 2 else GREEDY for i in range(8)]
    expected = [_result(roomy, [p], [q], 0) for p, q in zip(prompts, params)]
    results = cramped.generate(prompts, params)
    assert cramped.engine.num_preemptions > 0
    got = [(r.token_ids, [(e.token_id, e.logprob, e.top) for e in r.logprobs or []]) for r in results]
    assert got == expected
