"""Attention over the paged KV cache.

Every backend takes the same `AttentionMetadata` and the same cache layout, per layer
`[num_slots, kv_heads, head_dim]` for K and for V, where slot = block_id * block_size + offset. This is the
torch reference backend: it gathers each sequence's keys and values and runs SDPA. It is the oracle that
faster backends are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceSlice:
    """One sequence of the flat batch: its queries are rows [start, end) and it sees `kv_slots` keys."""

    start: int
    end: int
    kv_slots: torch.Tensor  # slots of every cached position 0..context_len-1, this step's tokens included
    causal_mask: torch.Tensor | None  # [queries, context] boolean, None when one query sees everything


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K and V are written
    sequences: list[SequenceSlice]

    @classmethod
    def build(
        cls,
        slot_mapping: torch.Tensor,
        query_lens: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        offsets = torch.arange(block_size, device=device)
        sequences = []
        start = 0
        for query_len, blocks, context_len in zip(query_lens, block_tables, context_lens):
            block_ids = torch.tensor(blocks[: (context_len + block_size - 1) // block_size], device=device)
            kv_slots = (block_ids[:, None] * block_size + offsets).flatten()[:context_len]
            mask = None
            if query_len > 1:
                # Query i sits at position context_len - query_len + i and sees keys up to there.
                query_pos = torch.arange(context_len - query_len, context_len, device=device)
                mask = torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]
            sequences.append(SequenceSlice(start, start + query_len, kv_slots, mask))
            start += query_len
        return cls(slot_mapping, sequences)


class TorchPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache[metadata.slot_mapping] = k
        v_cache[metadata.slot_mapping] = v
        out = torch.empty_like(q)
        for seq in metadata.sequences:
            query = q[seq.start : seq.end].transpose(0, 1)  # [heads, queries, head_dim]
            keys = k_cache[seq.kv_slots].transpose(0, 1)  # [kv_heads, context, head_dim]
            values = v_cache[seq.kv_slots].transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=seq.causal_mask, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out[seq.start : seq.end] = attended.transpose(0, 1)
        return out
