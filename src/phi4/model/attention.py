"""Attention over the paged KV cache.

Every backend takes the same `AttentionMetadata` and the same cache layout, per layer
`[num_slots, kv_heads, head_dim]` for K and for V, where slot = block_id * block_size + offset.
`TorchPagedAttention` gathers each sequence's keys and values and runs SDPA: the reference that faster
backends are tested against. `CpuPagedAttention` (phi4's CPU kernel) and the Triton backend compute the
same thing in a fixed order per query, so that results do not depend on the batch, on chunked prefill, or
on the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from phi4.model import cpu_kernels
from phi4.model.layers import RotaryEmbedding


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
    context_lens: torch.Tensor  # [B]


@dataclass
class AttentionMetadata:
    """One step's schedule: per sequence, its new tokens (query_lens), its blocks and its context length.

    Backends derive what they need from it once per step and reuse it in every layer: the torch backends
    the per-sequence slices below (`prefills`, `decodes`), the Triton backend a few index tensors
    (`backend_plans`).
    """

    slot_mapping: torch.Tensor  # [T] where each new token's K and V are written
    query_lens: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]  # keys per sequence, this step's tokens included
    block_size: int
    backend_plans: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        slot_mapping: torch.Tensor,
        query_lens: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        block_size: int,
        device: torch.device | None = None,
    ) -> AttentionMetadata:
        if device is not None:
            slot_mapping = slot_mapping.to(device)
        return cls(slot_mapping, list(query_lens), block_tables, list(context_lens), block_size)

    @property
    def device(self) -> torch.device:
        return self.slot_mapping.device

    @property
    def prefills(self) -> list[SequenceSlice]:
        return self._torch_layout[0]

    @property
    def decodes(self) -> DecodeGroup | None:
        return self._torch_layout[1]

    @cached_property
    def _torch_layout(self) -> tuple[list[SequenceSlice], DecodeGroup | None]:
        device, block_size = self.device, self.block_size
        offsets = torch.arange(block_size, device=device)

        def slots_of(blocks: list[int], context_len: int) -> torch.Tensor:
            block_ids = torch.tensor(blocks[: (context_len + block_size - 1) // block_size], device=device)
            return (block_ids[:, None] * block_size + offsets).flatten()[:context_len]

        prefills = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        start = 0
        for query_len, blocks, context_len in zip(self.query_lens, self.block_tables, self.context_lens):
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
            decodes = DecodeGroup(torch.tensor(decode_rows, device=device), padded, key_mask, lengths)
        return prefills, decodes


class PagedAttention:
    """What every backend does alike: write this step's keys and values into the cache, then attend with a
    plan that the backend derives from the step's metadata once and every layer reuses."""

    name = "paged"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
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
        return self.attend(q, k_cache, v_cache, self.plan_for(metadata, q.dtype))

    def plan_for(self, metadata: AttentionMetadata, dtype: torch.dtype) -> Any:
        """This step's plan: derived from the metadata by the first layer, reused by the others."""
        plan = metadata.backend_plans.get(self.name)
        if plan is None:
            plan = metadata.backend_plans[self.name] = self.plan(metadata, dtype)
        return plan

    def plan(self, metadata: AttentionMetadata, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Any) -> torch.Tensor:
        raise NotImplementedError


class TorchPagedAttention(PagedAttention):
    """The reference: each prefill through SDPA with its causal mask, all decodes in one padded SDPA call."""

    name = "torch"

    def plan(self, metadata: AttentionMetadata, dtype: torch.dtype) -> AttentionMetadata:
        return metadata  # its per-sequence slices are derived once, by the metadata itself

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               metadata: AttentionMetadata) -> torch.Tensor:
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


class CpuPagedAttention(PagedAttention):
    """phi4's CPU kernel (cpu_kernels.c): the rotary embedding and the cache write fused with the qkv
    projection's output, then every query attends to its own keys with an exact softmax, in an order fixed
    per query. Batch-invariant by construction and on any CPU: nothing depends on the other queries."""

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.rotary = rotary

    def forward_qkv(self, qkv: torch.Tensor, rope_rows: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    metadata: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (heads + 2 kv_heads) * head_dim] from the projection -> attention output [T, heads * head_dim]."""
        rotary = self.rotary
        cpu_kernels.rotary_and_cache(qkv, self.num_heads, self.num_kv_heads, self.head_dim, rotary.rotary_dim,
                                     rotary.cos, rotary.sin, rope_rows, metadata.slot_mapping, k_cache, v_cache)
        return cpu_kernels.attention(qkv, k_cache, v_cache, self.plan_for(metadata, qkv.dtype), self.num_heads,
                                     self.num_kv_heads, self.head_dim, self.scale, metadata.block_size)

    def plan(self, metadata: AttentionMetadata, dtype: torch.dtype) -> cpu_kernels.AttentionPlan:
        starts = [0]
        for query_len in metadata.query_lens:
            starts.append(starts[-1] + query_len)
        width = max(len(table) for table in metadata.block_tables)
        tables = [table + [0] * (width - len(table)) for table in metadata.block_tables]
        return cpu_kernels.AttentionPlan(torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(metadata.context_lens, dtype=torch.int32),
                             torch.tensor(tables, dtype=torch.int32))
