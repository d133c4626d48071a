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
    """A sequence with several queries (a prefill chunk): rows [start, end) of the flat batch."""

    start: int
    end: int
    kv_slots: torch.Tensor  # slots of every cached position 0..context_len-1, this step's tokens included
    causal_mask: torch.Tensor  # [queries, context] boolean


@dataclass
class DecodeGroup:
    """All sequences with a single query this step, attended in one padded call."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    kv_slots: torch.Tensor  # [B, longest context], padded with slot 0
    key_mask: torch.Tensor | None  # [B, 1, 1, longest context], False on padding; None without padding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K and V are written
    prefills: list[SequenceSlice]
    decodes: DecodeGroup | None

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

        def slots_of(blocks: list[int], context_len: int) -> torch.Tensor:
            block_ids = torch.tensor(blocks[: (context_len + block_size - 1) // block_size], device=device)
            return (block_ids[:, None] * block_size + offsets).flatten()[:context_len]

        prefills = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        start = 0
        for query_len, blocks, context_len in zip(query_lens, block_tables, context_lens):
            slots = slots_of(blocks, context_len)
            if query_len == 1:
                decode_rows.append(start)
                decode_slots.append(slots)
            else:
                # Query i sits at position context_len - query_len + i and sees keys up to there.
                query_pos = torch.arange(context_len - query_len, context_len, device=device)
                mask = torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]
                prefills.append(SequenceSlice(start, start + query_len, slots, mask))
            start += query_len
        decodes = None
        if decode_rows:
            lengths = torch.tensor([len(s) for s in decode_slots], device=device)
            longest = int(lengths.max())
            padded = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True)
            key_mask = None
            if bool((lengths < longest).any()):
                key_mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
            decodes = DecodeGroup(torch.tensor(decode_rows, device=device), padded, key_mask)
        return cls(slot_mapping, prefills, decodes)


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
        gqa = self.num_heads != self.num_kv_heads
        for seq in metadata.prefills:
            query = q[seq.start : seq.end].transpose(0, 1)  # [heads, queries, head_dim]
            keys = k_cache[seq.kv_slots].transpose(0, 1)  # [kv_heads, context, head_dim]
            values = v_cache[seq.kv_slots].transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=seq.causal_mask, scale=self.scale, enable_gqa=gqa
            )
            out[seq.start : seq.end] = attended.transpose(0, 1)
        group = metadata.decodes
        if group is not None:
            query = q[group.rows].unsqueeze(2)  # [B, heads, 1, head_dim]
            keys = k_cache[group.kv_slots].transpose(1, 2)  # [B, kv_heads, context, head_dim]
            values = v_cache[group.kv_slots].transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=group.key_mask, scale=self.scale, enable_gqa=gqa
            )
            out[group.rows] = attended.squeeze(2)
        return out
