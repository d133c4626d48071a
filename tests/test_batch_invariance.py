"""Batch invariance: a request's tokens and log-probabilities are bitwise the same alone or among 15
others of different lengths, prefilled whole or in chunks, with its prefix from the cache or not, and
when preempted and resumed."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from phi4 import LLM, SamplingParams
from phi4.model import batch_invariant
from phi4.model.attention import AttentionMetadata, TiledPagedAttention, TorchPagedAttention

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=2024, max_tokens=24, ignore_eos=True, logprobs=2)
ROW_COUNTS = list(range(1, 41)) + [64, 100, 257, 513]


@pytest.mark.parametrize("shape", [(384, 256), (256, 256), (1792, 256), (256, 896)])
def test_padded_linear_rows_are_bitwise_independent_of_the_row_count(shape: tuple[int, int]) -> None:
    # The empirical BLAS property the invariant path stands on, for the demo's layer shapes (both weight
    # layouts the engine uses on CPU).
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    x = torch.randn(600, shape[1], generator=generator)
    for w in (weight, weight.t().contiguous().t()):
        reference = batch_invariant.linear(x[:16], w)
        for m in ROW_COUNTS:
            rows = min(m, 16)
            assert torch.equal(batch_invariant.linear(x[:m], w)[:rows], reference[:rows]), f"{m} rows"


@pytest.mark.parametrize("shape", [(384, 256), (1792, 256), (256, 896), (100352, 256), (77, 1000)])
def test_the_rowwise_kernel_gives_a_row_the_same_bits_in_any_batch_at_any_address(shape: tuple[int, int]) -> None:
    """The float32 CPU path's products (model/cpu_kernels.py): no row count, position or alignment matters."""
    from phi4.model.cpu_kernels import rowwise_matmul

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(*shape, generator=generator)
    x = torch.randn(40, shape[1], generator=generator)
    reference = rowwise_matmul(x, weight)
    assert torch.allclose(reference, F.linear(x, weight), rtol=1e-4, atol=1e-4)
    for m in (1, 2, 3, 4, 5, 9, 16, 17, 40):
        assert torch.equal(rowwise_matmul(x[:m], weight), reference[:m]), f"{m} rows"
    assert torch.equal(rowwise_matmul(x[:9].flip(0), weight)[8], reference[0])
    shifted = torch.empty(9 * shape[1] + 3)[3:].view(9, shape[1])  # rows 12 bytes off the usual alignment
    shifted.copy_(x[:9])
    assert torch.equal(rowwise_matmul(shifted, weight), reference[:9])
    poisoned = x[:2].clone()
    poisoned[1, 0] = float("inf")
    assert torch.equal(rowwise_matmul(poisoned, weight)[0], reference[0])  # no fast-math shortcut leaks across rows
    assert not torch.isfinite(rowwise_matmul(poisoned, weight)[1]).all()


def test_lm_head_rows_are_bitwise_independent_of_position_and_neighbours() -> None:
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(100352, 256, generator=generator)
    x = torch.randn(40, 256, generator=generator)
    alone = [batch_invariant.lm_head(x[i : i + 1], head)[0] for i in range(3)]
    for m in (2, 3, 4, 5, 9, 16, 40):
        together = batch_invariant.lm_head(x[:m], head)
        assert all(torch.equal(together[i], alone[i]) for i in range(min(m, 3)))
    reversed_batch = batch_invariant.lm_head(x[:7].flip(0), head)
    assert torch.equal(reversed_batch[6], alone[0])
    assert torch.allclose(batch_invariant.lm_head(x[:5], head), F.linear(x[:5], head), rtol=1e-5, atol=1e-4)


def test_tiled_attention_equals_the_reference_backend() -> None:
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, block = 8, 2, 32, 16
    # Three sequences: a chunk of 5 queries after 300 cached tokens, a fresh prompt of 40, two decodes.
    query_lens, context_lens = [5, 40, 1, 1], [305, 40, 17, 600]
    tables, next_block = [], 0
    for length in context_lens:
        count = -(-length // block)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    slots = [tables[i][p // block] * block + p % block
             for i, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c - q, c)]
    metadata = AttentionMetadata.build(torch.tensor(slots), query_lens, tables, context_lens, block,
                                       torch.device("cpu"))
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, generator=generator)
    k = torch.randn(total, kv_heads, head_dim, generator=generator)
    v = torch.randn(total, kv_heads, head_dim, generator=generator)
    caches = torch.randn(2, next_block * block, kv_heads, head_dim, generator=generator)
    expected = TorchPagedAttention(heads, kv_heads, head_dim).forward(q, k, v, *caches.clone(), metadata)
    actual = TiledPagedAttention(heads, kv_heads, head_dim).forward(q, k, v, *caches.clone(), metadata)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


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
