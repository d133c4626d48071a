"""Batch-invariant tiled attention against the SDPA reference backend, same process, CPU.

16 decoding sequences with contexts of 130-256 keys in a shuffled paged cache, the demo's attention shape
(8 heads, 2 kv heads, head_dim 32). Prints milliseconds per layer call of each backend (best of --repeats
rounds of 40 calls) and the ratio. Usage: python benchmarks/attention_cpu.py [--repeats 5] [--sequences 16]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from phi4.model.attention import AttentionMetadata, TiledPagedAttention, TorchPagedAttention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 32, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    context_lens = [rng.randint(130, 256) for _ in range(args.sequences)]
    blocks = list(range(sum(-(-c // BLOCK) for c in context_lens)))
    rng.shuffle(blocks)
    tables = []
    for context_len in context_lens:
        count = -(-context_len // BLOCK)
        tables.append(blocks[:count])
        blocks = blocks[count:]
    slots = torch.tensor([t[(c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for t, c in zip(tables, context_lens)])
    num_slots = (max(max(t) for t in tables) + 1) * BLOCK
    k_cache, v_cache = torch.randn(num_slots, KV_HEADS, HEAD_DIM), torch.randn(num_slots, KV_HEADS, HEAD_DIM)
    q = torch.randn(args.sequences, HEADS, HEAD_DIM)
    k, v = torch.randn(args.sequences, KV_HEADS, HEAD_DIM), torch.randn(args.sequences, KV_HEADS, HEAD_DIM)
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        for backend in (TiledPagedAttention, TorchPagedAttention):
            attention = backend(HEADS, KV_HEADS, HEAD_DIM)
            metadata = AttentionMetadata.build(slots, [1] * args.sequences, tables, context_lens, BLOCK)
            start = time.perf_counter()
            for _ in range(40):  # one step's plan, reused by every layer as in the model
                attention.forward(q, k, v, k_cache, v_cache, metadata)
            ms = (time.perf_counter() - start) / 40 * 1e3
            best[backend.__name__] = min(best.get(backend.__name__, ms), ms)
    tiled, reference = best["TiledPagedAttention"], best["TorchPagedAttention"]
    print(json.dumps({"figure": "decode_attention_ms_per_layer", "sequences": args.sequences,
                      "tiled_batch_invariant": round(tiled, 3), "sdpa_reference": round(reference, 3),
                      "ratio": round(tiled / reference, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
