"""phi4's CPU kernels (model/cpu_kernels.c): each is the computation it replaces, a row's bits never depend on
the rows beside it, and the AVX-512, AVX2 and portable builds of the same source give the same bits, so
nothing rests on what one CPU or one BLAS happens to do."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from phi4.config import ModelConfig
from phi4.model import cpu_kernels, layers
from phi4.model.attention import AttentionMetadata, CpuPagedAttention, TorchPagedAttention
from phi4.model.cpu_kernels import PackedWeight

STORED = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
# (out, in): the demo's projections, a head-sized product, an odd shape, and a reduction long enough to be
# carried across chunks of K (Phi-4's down_proj reads 17,920).
SHAPES = [(384, 256), (256, 896), (100352, 256), (77, 1000), (96, 2600)]
PORTABLE_FLAGS = ("-mno-avx512f", "-mno-avx2", "-mno-avx", "-mno-fma", "-mno-f16c")  # plain C, any x86-64


def stored_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> tuple[PackedWeight, torch.Tensor]:
    """A packed weight and its exact float32 value (float8 with per-channel scales)."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5
    if dtype == torch.float8_e4m3fn:
        scale = weight.abs().amax(dim=1) / 448
        values = (weight / scale[:, None]).to(dtype)
        return PackedWeight.pack(values, scale), values.float() * scale[:, None]
    stored = weight.to(dtype)
    return PackedWeight.pack(stored), stored.float()


def product(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    scale = torch.ones(x.shape[0]) if weight.scale is not None else None
    return cpu_kernels.linear(x, weight, scale)


@pytest.mark.parametrize("dtype", STORED, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_products_read_any_stored_precision_and_give_a_row_the_same_bits_in_any_batch(
    dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    weight, exact = stored_weight(shape, dtype, seed=shape[0])
    x = torch.randn(40, shape[1], generator=torch.Generator().manual_seed(1))
    full = product(x, weight)
    torch.testing.assert_close(full, (x.double() @ exact.double().T).float(), rtol=1e-4, atol=1e-4)
    for rows in (1, 2, 3, 5, 6, 7, 9, 16, 17, 39):  # register tiles, widened chunks, and their remainders
        assert torch.equal(product(x[:rows], weight), full[:rows]), f"{rows} rows"
    assert torch.equal(product(x[:9].flip(0), weight)[8], full[0])  # position in the batch
    shifted = torch.empty(9 * shape[1] + 3)[3:].view(9, shape[1])  # rows 12 bytes off the usual alignment
    shifted.copy_(x[:9])
    assert torch.equal(product(shifted, weight), full[:9])


def test_a_nan_or_infinity_stays_in_its_own_row() -> None:
    weight, _ = stored_weight((256, 256), torch.bfloat16, seed=0)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    clean = product(x[:1], weight)
    x[1, 0] = float("inf")
    out = product(x, weight)
    assert torch.equal(out[0], clean[0]) and not torch.isfinite(out[1]).all()


def test_the_row_kernels_compute_what_the_reference_layers_compute() -> None:
    generator = torch.Generator().manual_seed(3)
    x, residual = torch.randn(5, 200, generator=generator), torch.randn(5, 200, generator=generator)
    weight = torch.rand(200, generator=generator) + 0.5
    for res in (None, residual):
        expected = layers.add_rms_norm(x, res, weight, 1e-5)
        actual = cpu_kernels.add_rms_norm(x, None if res is None else res.clone(), weight, 1e-5)
        assert torch.equal(actual[1], expected[1])  # the residual sum rounds once, like the reference
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(3, 2 * 1100, generator=generator) * 30  # exp far into both tails
    torch.testing.assert_close(cpu_kernels.silu_and_mul(gate_up), layers.silu_and_mul(gate_up), rtol=1e-6, atol=1e-6)


def tiny_config(partial: float = 1.0, **overrides: object) -> ModelConfig:
    fields = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, vocab_size=100, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  rope_theta=10000.0, partial_rotary_factor=partial, longrope=None, tie_word_embeddings=False,
                  torch_dtype="bfloat16", eos_token_ids=())
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


class PagedCache:
    """Sequences with given query and context lengths over a cache whose blocks are shuffled."""

    def __init__(self, query_lens: list[int], context_lens: list[int], config: ModelConfig, seed: int) -> None:
        rng = random.Random(seed)
        self.block = 16
        needed = [-(-c // self.block) for c in context_lens]
        order = list(range(sum(needed) + 2))
        rng.shuffle(order)
        self.tables = []
        for count in needed:
            self.tables.append(order[:count])
            order = order[count:]
        generator = torch.Generator().manual_seed(seed)
        shape = ((sum(needed) + 2) * self.block, config.num_key_value_heads, config.head_dim)
        self.k, self.v = torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)
        slots = [self.tables[i][p // self.block] * self.block + p % self.block
                 for i, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c - q, c)]
        self.metadata = AttentionMetadata.build(torch.tensor(slots), query_lens, self.tables, context_lens, self.block)
        self.positions = torch.tensor([p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)])


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (6, 2, 48), (4, 4, 32)],
                         ids=["group4", "group3", "group1"])  # tiles of rows within one token, across tokens
def test_fused_rotary_and_attention_equal_the_reference_backend(partial: float, heads: int, kv_heads: int,
                                                                 head_dim: int) -> None:
    config = tiny_config(partial, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    rotary = layers.RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    # A chunk of 7 queries after 300 cached tokens, a fresh prompt of 38, two decodes, one at 600 keys (blocks of
    # 16 queries: 7 and 6 leave tiles of 3 and 2 rows that span tokens, one head per token).
    cache = PagedCache([7, 38, 1, 1], [307, 38, 17, 600], config, seed=4)
    tokens = cache.positions.shape[0]
    qkv = torch.randn(tokens, config.q_size + 2 * config.kv_size, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
    shaped_q = rotary.apply(q.reshape(tokens, heads, head_dim), cache.positions)
    shaped_k = rotary.apply(k.reshape(tokens, kv_heads, head_dim), cache.positions)
    shaped_v = v.reshape(tokens, kv_heads, head_dim)
    expected = TorchPagedAttention(heads, kv_heads, head_dim).forward(
        shaped_q, shaped_k, shaped_v, cache.k.clone(), cache.v.clone(), cache.metadata).reshape(tokens, -1)
    k_cache, v_cache = cache.k.clone(), cache.v.clone()
    actual = CpuPagedAttention(heads, kv_heads, head_dim, rotary).forward_qkv(qkv.clone(), cache.positions, k_cache,
                                                                              v_cache, cache.metadata)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    slots = cache.metadata.slot_mapping
    torch.testing.assert_close(k_cache[slots], shaped_k, rtol=0, atol=0)  # rotated as the reference rotates
    assert torch.equal(v_cache[slots], shaped_v)


def test_a_query_attends_the_same_alone_as_in_any_batch() -> None:
    config = tiny_config()
    rotary = layers.RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    width = config.q_size + 2 * config.kv_size
    cache = PagedCache([3, 1, 7], [50, 300, 7], config, seed=6)
    qkv = torch.randn(11, width, generator=torch.Generator().manual_seed(7))
    attention = CpuPagedAttention(8, 2, 32, rotary)

    def attend(metadata: AttentionMetadata, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return attention.forward_qkv(qkv[rows].clone(), positions, cache.k.clone(), cache.v.clone(), metadata)

    together = attend(cache.metadata, torch.arange(11), cache.positions)
    alone = AttentionMetadata.build(torch.tensor([cache.metadata.slot_mapping[3].item()]), [1], [cache.tables[1]],
                                    [300], cache.block)
    assert torch.equal(attend(alone, torch.tensor([3]), torch.tensor([299]))[0], together[3])


def build_variants() -> dict[str, cpu_kernels.ctypes.CDLL]:
    """The same source built for AVX-512 (where the CPU has it), AVX2 and portable C."""
    variants = {"native": (), "avx2": ("-mno-avx512f",), "portable": PORTABLE_FLAGS}
    return {name: cpu_kernels.load_library(cpu_kernels.build_library(flags)) for name, flags in variants.items()}


def test_every_instruction_set_build_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = build_variants()
    assert builds["portable"].phi4_isa() == b"portable" and builds["avx2"].phi4_isa() == b"avx2"
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, library in builds.items():
        monkeypatch.setattr(cpu_kernels, "kernels", lambda library=library: library)
        outputs[name] = run_every_kernel(seed=8)
    for name, results in outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(results, outputs["native"], strict=True)), name


def run_every_kernel(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    results = []
    for dtype in STORED:
        weight, _ = stored_weight((200, 600), dtype, seed)
        for rows in (1, 2, 3, 7, 40):  # each tile shape of each build: whole blocks, narrow tiles, widened chunks
            results.append(product(torch.randn(rows, 600, generator=generator), weight))
    x = torch.randn(9, 200, generator=generator)
    results.extend(cpu_kernels.add_rms_norm(x, x.clone(), torch.rand(200, generator=generator), 1e-5))
    results.append(cpu_kernels.silu_and_mul(torch.randn(9, 400, generator=generator) * 20))
    config = tiny_config(0.75, head_dim=48, num_attention_heads=6)
    rotary = layers.RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    cache = PagedCache([6, 1], [70, 33], config, seed)
    qkv = torch.randn(7, config.q_size + 2 * config.kv_size, generator=generator)
    attention = CpuPagedAttention(6, 2, 48, rotary)
    results.append(attention.forward_qkv(qkv, cache.positions, cache.k, cache.v, cache.metadata))
    results.extend([qkv, cache.k, cache.v])
    # the fused decoder (phi4_decoder) over one layer of the same shapes, weights in bfloat16
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = [(config.q_size + 2 * config.kv_size, hidden), (hidden, config.q_size), (2 * inter, hidden),
              (hidden, inter)]
    packed = [stored_weight(shape, torch.bfloat16, seed + i)[0] for i, shape in enumerate(shapes)]
    norms = [torch.rand(hidden, generator=generator) + 0.5 for _ in range(3)]
    decoder = cpu_kernels.DecoderStack([cpu_kernels.LayerWeights(norms[0], norms[1], *packed)], norms[2],
                                       intermediate=inter, heads=6, kv_heads=2, head_dim=48,
                                       rotary_dim=rotary.rotary_dim, eps=1e-5, cos=rotary.cos, sin=rotary.sin)
    kv_caches = torch.stack((cache.k, cache.v))[None].contiguous()
    results.append(decoder.forward(torch.randn(7, hidden, generator=generator), cache.positions,
                                   cache.metadata.slot_mapping, kv_caches,
                                   attention.plan_for(cache.metadata, torch.float32), cache.block))
    results.append(kv_caches)
    return results


def test_a_tied_head_serves_embedding_rows_from_its_packed_layout() -> None:
    table = torch.randn(300, 64, generator=torch.Generator().manual_seed(9)).bfloat16()
    packed = PackedWeight.pack(table)
    ids = torch.tensor([0, 63, 64, 299, 5])
    assert torch.equal(packed.rows(ids), F.embedding(ids, table).float())


def test_the_library_is_built_once_per_cpu_and_reused(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PHI4_CACHE", str(tmp_path))
    first = cpu_kernels.build_library()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build_library() == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(cpu_kernels.KernelBuildError, match="C compiler"):
        cpu_kernels.build_library(("-DANOTHER_BUILD",))


def test_phi4_kernel_flags_choose_the_build_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PHI4_KERNEL_FLAGS` reaches the compiler: the build a CPU without AVX-512 or AVX2 would get runs here."""
    monkeypatch.setenv("PHI4_KERNEL_FLAGS", " ".join(PORTABLE_FLAGS))
    assert cpu_kernels.kernels.__wrapped__().phi4_isa() == b"portable"


def test_a_prompt_attends_the_same_whole_in_chunks_or_token_by_token() -> None:
    config = tiny_config()
    rotary = layers.RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    attention = CpuPagedAttention(8, 2, 32, rotary)
    whole = PagedCache([40], [40], config, seed=10)
    qkv = torch.randn(40, config.q_size + 2 * config.kv_size, generator=torch.Generator().manual_seed(11))
    k_cache, v_cache = whole.k.clone(), whole.v.clone()
    expected = attention.forward_qkv(qkv.clone(), whole.positions, k_cache, v_cache, whole.metadata)
    table, block = whole.tables[0], whole.block
    for cuts in ([0, 17, 40], list(range(41))):  # two chunks (one spans a query block), or one token a step
        k_cache, v_cache = whole.k.clone(), whole.v.clone()
        pieces = []
        for start, end in zip(cuts, cuts[1:]):
            slots = torch.tensor([table[p // block] * block + p % block for p in range(start, end)])
            metadata = AttentionMetadata.build(slots, [end - start], [table], [end], block)
            pieces.append(attention.forward_qkv(qkv[start:end].clone(), torch.arange(start, end), k_cache, v_cache,
                                                metadata))
        assert torch.equal(torch.cat(pieces), expected), cuts


@pytest.mark.parametrize("checkpoint", ["demo_dir", "mini_dir"])
def test_the_fused_decoder_gives_the_bits_of_the_layer_by_layer_kernels(checkpoint: str,
                                                                       request: pytest.FixtureRequest) -> None:
    """One phi4_decoder call per step (the CPU default) against the same kernels called layer by layer from
    Python: final states and every cached key and value, bit for bit, on a step that mixes a prefill chunk
    past earlier context with decodes (the mini checkpoint: partial rotary, LongRoPE rows, a tied head)."""
    from phi4.model.loader import load_model

    model = load_model(request.getfixturevalue(checkpoint), torch.device("cpu"), torch.float32)
    assert model._decoder is not None, "the CPU default runs the fused decoder"
    config = model.config
    cache = PagedCache([9, 1, 1, 30], [75, 40, 130, 30], config, seed=12)
    tokens = cache.positions.shape[0]
    kv_caches = torch.randn(config.num_hidden_layers, 2, *cache.k.shape, generator=torch.Generator().manual_seed(13))
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(14))
    rope_rows = cache.positions + (config.max_position_embeddings if config.longrope is not None else 0) * (
        cache.positions >= 64)  # the long factors for positions past the mini's original context

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        caches = kv_caches.clone()
        metadata = AttentionMetadata.build(cache.metadata.slot_mapping, cache.metadata.query_lens, cache.tables,
                                           cache.metadata.context_lens, cache.block)
        return model.forward(ids, rope_rows, caches, metadata), caches

    fused, fused_caches = run()
    model._decoder = None
    by_layer, by_layer_caches = run()
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, by_layer)
    assert torch.equal(fused_caches, by_layer_caches)
