"""Attention over the paged KV cache.

Every backend takes the same `AttentionMetadata` and the same cache layout, per layer
`[num_slots, kv_heads, head_dim]` for K and for V, where slot = block_id * block_size + offset.
`TorchPagedAttention` gathers each sequence's keys and values and runs SDPA: the reference that faster
backends are tested against. `TiledPagedAttention` computes the same thing in a fixed order per query, so
that results do not depend on the batch, on chunked prefill, or on the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from phi4.model.batch_invariant import invariant_rows, pad_rows


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
        plan = metadata.backend_plans.get(self.name)
        if plan is None:
            plan = metadata.backend_plans[self.name] = self.plan(metadata, q.dtype)
        return self.attend(q, k_cache, v_cache, plan)

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


class TiledPagedAttention(PagedAttention):
    """Batch-invariant attention: keys in fixed tiles of KEY_TILE, an online softmax across tiles.

    A query's result depends only on its own keys. Within a tile every reduction has the same length
    whatever the context; tiles past a query's position are fully masked and leave its running max, sum
    and output exactly unchanged; the matrix products see row counts of one equivalence class (see
    batch_invariant) and per-entry shapes that do not depend on how many sequences share the call. So a
    token computes the same bits alone or batched, prefilled whole or in chunks, or decoded.

    Layout: the batched products run over (kv head, sequence) entries, each `[rows, head_dim]` with rows =
    (query, head in group): one product per step of the online softmax whatever the number of kv heads.
    The mask is an additive bias (0 or -inf) built once per step and folded into the score product by
    `baddbmm`; the first tile needs no rescaling.
    """

    name = "tiled"
    KEY_TILE = 256

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: list) -> torch.Tensor:
        out = torch.empty_like(q)
        for (rows, n), sequences in plan:
            attended = self._attend(q[rows].view(-1, n, *q.shape[1:]), sequences, k_cache, v_cache)
            out[rows] = attended.reshape(-1, *q.shape[1:])
        return out

    def plan(self, metadata: AttentionMetadata, dtype: torch.dtype) -> list:
        """Per step: the query rows, and the tiles of slots and mask biases that every layer reuses."""
        device = metadata.device
        plans = []
        for seq in metadata.prefills:
            rows = torch.arange(seq.start, seq.end, device=device)
            plans.append(((rows, seq.end - seq.start),
                          self._tile_plan(seq.kv_slots.unsqueeze(0), seq.causal_mask.unsqueeze(0), dtype)))
        group = metadata.decodes
        if group is not None:
            longest = group.kv_slots.shape[1]
            allowed = (torch.arange(longest, device=device)[None, :] < group.context_lens[:, None]).unsqueeze(1)
            plans.append(((group.rows, 1), self._tile_plan(group.kv_slots, allowed, dtype)))
        return plans

    def _tile_plan(
        self, kv_slots: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """kv_slots [B, L] and allowed [B, n, L] cut into key tiles: (slots [B, tile], bias [E or 1, rows, tile])."""
        rows = allowed.shape[1] * self.group
        padded_rows = invariant_rows(rows)
        allowed = allowed.repeat_interleave(self.group, dim=1)  # rows are (token, head in group), token-major
        allowed = pad_rows(allowed, padded_rows, dim=1)
        allowed[:, rows:, 0] = True  # padding rows see key 0, so that they stay finite
        padded_length = -(-kv_slots.shape[1] // self.KEY_TILE) * self.KEY_TILE
        kv_slots = pad_rows(kv_slots, padded_length, dim=1)
        allowed = pad_rows(allowed, padded_length, dim=2)
        bias = torch.zeros(allowed.shape, device=allowed.device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        if bias.shape[0] > 1:  # one mask per sequence, for each kv head: entries are (kv head, sequence)
            bias = bias.repeat(self.num_kv_heads, 1, 1)
        tiles = [
            (kv_slots[:, start : start + self.KEY_TILE], bias[..., start : start + self.KEY_TILE])
            for start in range(0, padded_length, self.KEY_TILE)
        ]
        return tiles, padded_rows

    def _attend(
        self,
        queries: torch.Tensor,  # [B, n, heads, head_dim]
        plan: tuple[list[tuple[torch.Tensor, torch.Tensor]], int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        tiles, padded_rows = plan
        batch, n, _, head_dim = queries.shape
        kv_heads, group = self.num_kv_heads, self.group
        rows = n * group
        entries = kv_heads * batch
        q_rows = queries.view(batch, n, kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
        q_rows = pad_rows(q_rows.reshape(kv_heads, batch, rows, head_dim), padded_rows, dim=2)
        q_rows = q_rows.reshape(entries, padded_rows, head_dim)

        def by_entry(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            # whole cache rows are the fastest gather; one copy then puts each (kv head, sequence) together
            return cache[slots].permute(2, 0, 1, 3).reshape(entries, -1, head_dim)

        attended = self._online_softmax(q_rows, [(by_entry(k_cache, slots), by_entry(v_cache, slots), bias)
                                                 for slots, bias in tiles])
        out = attended[:, :rows].reshape(kv_heads, batch, n, group, head_dim).permute(1, 2, 0, 3, 4)
        return out.reshape(batch, n, kv_heads * group, head_dim)

    def _online_softmax(
        self, q_rows: torch.Tensor, tiles: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """q_rows [E, rows, head_dim] over tiles of (keys, values [E, tile, head_dim], bias [E or 1, rows, tile])."""
        running_max = running_sum = acc = None
        for keys, values, bias in tiles:
            scores = torch.baddbmm(bias, q_rows, keys.transpose(1, 2), alpha=self.scale)
            tile_max = scores.amax(dim=-1)
            new_max = tile_max if running_max is None else torch.maximum(running_max, tile_max)
            probs = torch.exp(scores - new_max.unsqueeze(-1))
            if running_max is None:  # the first tile: nothing to rescale
                running_sum, acc = probs.sum(dim=-1), torch.bmm(probs, values)
            else:
                correction = torch.exp(running_max - new_max)
                running_sum = running_sum * correction + probs.sum(dim=-1)
                acc = torch.baddbmm(acc * correction.unsqueeze(-1), probs, values)
            running_max = new_max
        assert acc is not None and running_sum is not None
        return acc / running_sum.unsqueeze(-1)
