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


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (6, 2, 64), (4, 4, 32), (6, 2, 48)])
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


FLOATS = [torch.float32, torch.float16]  # the interpreter cannot do bfloat16 arithmetic; a GPU run adds it
if torch.cuda.is_available():
    FLOATS.append(torch.bfloat16)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_row_kernels_match_the_torch_layers(dtype: torch.dtype) -> None:
    from phi4.config import ModelConfig
    from phi4.model import layers, triton_ops

    torch.manual_seed(1)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    x, residual = (torch.randn(5, 96, device=DEVICE).to(dtype) for _ in range(2))
    weight = torch.rand(96, device=DEVICE).to(dtype) + 0.5
    for res in (None, residual):
        expected = layers.add_rms_norm(x, res, weight, 1e-5)
        actual = triton_ops.add_rms_norm(x, res, weight, 1e-5)
        torch.testing.assert_close(actual[1], expected[1], atol=0, rtol=0)  # the sum rounds once, like the reference
        torch.testing.assert_close(actual[0], expected[0], **tolerance)
    gate_up = torch.randn(3, 2 * 1100, device=DEVICE).to(dtype)  # wider than one block
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up), layers.silu_and_mul(gate_up), **tolerance)
    for partial in (1.0, 0.75):
        config = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, vocab_size=100, max_position_embeddings=64,
                             rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=partial, longrope=None,
                             tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_ids=())
        rotary = layers.RotaryEmbedding(config, DEVICE, dtype)
        q = torch.randn(7, 4, 64, device=DEVICE).to(dtype)
        rows = torch.tensor([0, 1, 2, 30, 31, 62, 63], device=DEVICE)
        torch.testing.assert_close(triton_ops.rotary(q, rotary.cos, rotary.sin, rows), rotary.apply(q, rows),
                                   **tolerance)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("n", "k"), [(200, 96), (96, 4160)])  # the second is split along k in 4 parts
def test_the_invariant_matmul_is_a_matmul_whose_rows_ignore_the_batch(dtype: torch.dtype, n: int, k: int) -> None:
    from phi4.model import triton_ops

    torch.manual_seed(2)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    x = torch.randn(70, k, device=DEVICE).to(dtype)  # more rows than one tile, fewer than two
    full = triton_ops.matmul(x, weight)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(full.float(), x.float() @ weight.float().T, **tolerance)
    for rows in (1, 3, 64):
        assert torch.equal(triton_ops.matmul(x[:rows], weight), full[:rows])
    assert torch.equal(triton_ops.matmul(x[66:], weight), full[66:])


def test_decode_steps_on_padded_graph_buckets_keep_every_token(demo_dir) -> None:  # noqa: ANN001
    """The static decode path (CUDA graphs on a GPU, run eagerly here) pads 3 sequences to a bucket of 4."""
    prompts = [list(range(300, 300 + n)) for n in (5, 17, 40)]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.7, seed=4, max_tokens=9, ignore_eos=True)]  # outlives the others: 3 -> 1 row
    results = {}
    for graphs in (True, False):
        llm = LLM(str(demo_dir), device=DEVICE.type, dtype="float32", attention_backend="triton", max_model_len=256,
                  cuda_graphs=graphs)
        assert (llm.engine.runner.decode_graphs is not None) == graphs
        results[graphs] = [(r.token_ids, r.logprobs) for r in llm.generate(prompts, params)]
    assert results[True] == results[False]


def test_the_invariant_fp8_matmul_matches_scaled_mm_arithmetic() -> None:
    from phi4.model import triton_ops
    from phi4.model.fp8 import Fp8Weight, quantize_activations

    torch.manual_seed(4)
    weight = Fp8Weight.quantize(torch.randn(96, 4160, device=DEVICE) / 64)  # split along k, too
    x = torch.randn(70, 4160, device=DEVICE)
    values, scale = quantize_activations(x)
    full = triton_ops.matmul(values, weight.values, torch.float32, scale, weight.scale)
    expected = (values.float() @ weight.values.float().T) * scale[:, None] * weight.scale[None, :]
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
    for rows in (1, 5, 64):
        assert torch.equal(triton_ops.matmul(values[:rows], weight.values, torch.float32, scale[:rows], weight.scale),
                           full[:rows])
