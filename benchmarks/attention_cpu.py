"""phi4's CPU attention kernel against the SDPA reference backend, same process, CPU.

Two workloads at the demo's attention shape (8 heads, 2 kv heads, head_dim 32) in a shuffled paged cache:
16 decoding sequences with contexts of 130-256 keys, and one 512-token prompt prefilled whole. The phi4
kernel also rotates q and k and writes the cache (the reference is given them rotated). Prints
milliseconds per layer call of each (best of --repeats rounds of 20 calls) and the ratio.
Usage: python benchmarks/attention_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

import torch

from phi4.config import ModelConfig
from phi4.model.attention import AttentionMetadata, CpuPagedAttention, TorchPagedAttention
from phi4.model.layers import RotaryEmbedding

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 32, 16


def workload(rng: random.Random, query_lens: list[int], context_lens: list[int]) -> tuple[AttentionMetadata, int]:
    blocks = list(range(sum(-(-c // BLOCK) for c in context_lens)))
    rng.shuffle(blocks)
    tables = []
    for context_len in context_lens:
        count = -(-context_len // BLOCK)
        tables.append(blocks[:count])
        blocks = blocks[count:]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, q, c in zip(tables, query_lens, context_lens) for p in range(c - q, c)]
    metadata = AttentionMetadata.build(torch.tensor(slots), query_lens, tables, context_lens, BLOCK)
    return metadata, (max(max(t) for t in tables) + 1) * BLOCK


def best_ms(call: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            call()
        best = min(best, (time.perf_counter() - start) / 20 * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=HEADS * HEAD_DIM, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=100,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=250000.0,
                         partial_rotary_factor=1.0, longrope=None, tie_word_embeddings=False, torch_dtype="bfloat16",
                         eos_token_ids=())
    rotary = RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    phi4, reference = CpuPagedAttention(HEADS, KV_HEADS, HEAD_DIM, rotary), TorchPagedAttention(HEADS, KV_HEADS, HEAD_DIM)
    decodes = [rng.randint(130, 256) for _ in range(16)]
    for name, (query_lens, context_lens) in {"decode_16_sequences": ([1] * 16, decodes),
                                             "prefill_512": ([512], [512])}.items():
        metadata, num_slots = workload(rng, query_lens, context_lens)
        tokens = sum(query_lens)
        k_cache, v_cache = torch.randn(num_slots, KV_HEADS, HEAD_DIM), torch.randn(num_slots, KV_HEADS, HEAD_DIM)
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        positions = torch.tensor([p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)])
        q = torch.randn(tokens, HEADS, HEAD_DIM)
        k, v = torch.randn(tokens, KV_HEADS, HEAD_DIM), torch.randn(tokens, KV_HEADS, HEAD_DIM)
        # one step's plan, reused by every layer as in the model
        ours = best_ms(lambda: phi4.forward_qkv(qkv, positions, k_cache, v_cache, metadata), args.repeats)
        sdpa = best_ms(lambda: reference.forward(q, k, v, k_cache, v_cache, metadata), args.repeats)
        print(json.dumps({"figure": f"attention_ms_per_layer_{name}", "phi4_cpu_kernel": round(ours, 3),
                          "sdpa_reference": round(sdpa, 3), "ratio": round(ours / sdpa, 2),
                          "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
