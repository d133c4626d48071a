"""The Triton kernels against the torch reference: natively on CUDA, in Triton's interpreter elsewhere.

The interpreter runs each program with numpy, so on CPU these tests check the kernels' logic (indexing,
masking, segment merging, the order of operations that batch invariance rests on); on a GPU they also
check the compiled code.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels
triton = pytest.importorskip("triton")

from phi4 import LLM, SamplingParams  # noqa: E402
from phi4.model.attention import AttentionMetadata, TorchPagedAttention  # noqa: E402
from phi4.model.triton_attention import TritonPagedAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16


class PagedCache:
    """A KV cache with randomly placed blocks, and helpers to schedule sequences over it."""

    def __init__(self, rng: random.Random, context_lens: list[int], kv_heads: int, head_dim: int) -> None:
        needed = [-(-c // BLOCK) for c in context_lens]
        order = list(range(1, sum(needed) + 1))  # block 0 is padding: a read from it shows in the result
        rng.shuffle(order)
        self.tables = []
        for count in needed:
            self.tables.append(order[:count])
            order = order[count:]
        slots = (sum(needed) + 1) * BLOCK
        self.k = torch.randn(slots, kv_heads, head_dim, device=DEVICE)
        self.v = torch.randn(slots, kv_heads, head_dim, device=DEVICE)
        self.k[:BLOCK] = 1e3  # finite: the torch backends pad with slot 0 and mask it (a NaN would leak)
        self.v[:BLOCK] = 1e3

    def metadata(self, seqs: list[int], query_lens: list[int], context_lens: list[int]) -> AttentionMetadata:
        slots = []
        for seq, query_len, context_len in zip(seqs, query_lens, context_lens):
            table = self.tables[seq]
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(context_len - query_len, context_len)]
        return AttentionMetadata.build(torch.tensor(slots, device=DEVICE), query_lens,
                                       [self.tables[s] for s in seqs], context_lens, BLOCK)


def run(backend, cache: PagedCache, metadata: AttentionMetadata, q, k, v) -> torch.Tensor:  # noqa: ANN001
    return backend.forward(q, k, v, cache.k.clone(), cache.v.clone(), metadata)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (6, 2, 64), (4, 4, 32)])
def test_mixed_prefill_chunks_and_decodes_match_the_reference(heads: int, kv_heads: int, head_dim: int) -> None:
    rng = random.Random(heads * 100 + head_dim)
    torch.manual_seed(heads)
    for _ in range(3):
        count = rng.randint(2, 5)
        context_lens = [rng.randint(1, 200) for _ in range(count)]
        query_lens = [rng.choice([1, 1, rng.randint(1, c)]) for c in context_lens]
        cache = PagedCache(rng, context_lens, kv_heads, head_dim)
        tokens = sum(query_lens)
        q, k, v = (torch.randn(tokens, h, head_dim, device=DEVICE) for h in (heads, kv_heads, kv_heads))
        seqs = list(range(count))
        expected = run(TorchPagedAttention(heads, kv_heads, head_dim), cache,
                       cache.metadata(seqs, query_lens, context_lens), q, k, v)
        actual = run(TritonPagedAttention(heads, kv_heads, head_dim, segment=64, block_n=32), cache,
                     cache.metadata(seqs, query_lens, context_lens), q, k, v)
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_a_token_computes_the_same_bits_decoded_alone_batched_or_inside_a_prefill() -> None:
    """Split decode (segments in parallel, then merged) and sequential prefill agree bit for bit."""
    rng = random.Random(7)
    heads, kv_heads, head_dim = 8, 2, 32
    context_lens = [150, 61, 200, 9]
    cache = PagedCache(rng, context_lens, kv_heads, head_dim)
    backend = TritonPagedAttention(heads, kv_heads, head_dim, segment=64, block_n=32)
    # The target: sequence 0's token at position 149, its query and new K/V fixed.
    q, k, v = (torch.randn(1, h, head_dim, device=DEVICE) for h in (heads, kv_heads, kv_heads))
    alone = run(backend, cache, cache.metadata([0], [1], [150]), q, k, v)
    # Decoded among others whose contexts need more segments than it does.
    others = [torch.randn(3, h, head_dim, device=DEVICE) for h in (heads, kv_heads, kv_heads)]
    batched = run(backend, cache, cache.metadata([1, 0, 2, 3], [1, 1, 1, 1], [61, 150, 200, 9]),
                  *(torch.cat((o[:1], t, o[1:])) for o, t in zip(others, (q, k, v))))
    assert torch.equal(batched[1], alone[0])
    # The last token of a 7-token prefill chunk (sequential segments, a tile shared with other tokens),
    # next to a decode in the same step.
    table = cache.tables[0]
    cached = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(143, 149)]  # keep what the cache holds there
    chunk = [torch.randn(6, heads, head_dim, device=DEVICE), cache.k[cached], cache.v[cached]]
    prefill = run(backend, cache, cache.metadata([3, 0], [1, 7], [9, 150]),
                  *(torch.cat((o[:1], c, t)) for o, c, t in zip(others, chunk, (q, k, v))))
    assert torch.equal(prefill[-1], alone[0])


def test_the_engine_on_triton_attention_keeps_the_reference_backends_greedy_tokens(demo_dir) -> None:  # noqa: ANN001
    prompts = [[rng_token for rng_token in range(200, 230)], [101, 102, 103, 104, 105] * 8]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = {}
    for backend in ("triton", "torch"):
        llm = LLM(str(demo_dir), device=DEVICE.type, dtype="float32", attention_backend=backend,
                  max_model_len=256, max_num_batched_tokens=32)  # chunked prefill of the 40-token prompt
        results[backend] = [r.token_ids for r in llm.generate(prompts, params)]
    assert results["triton"] == results["torch"]
