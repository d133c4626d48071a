"""Attention over the paged KV cache in Triton: one kernel for prefill, chunked prefill and decode.

Batch invariance by construction. A program takes a tile of BLOCK_M rows, (query token, head in its kv
group), of one sequence and one kv head, and walks that sequence's keys in fixed segments of SEGMENT keys,
each cut into tiles of BLOCK_N keys, both aligned to absolute positions. Each segment gives a partial
softmax state (max, sum, weighted values) computed from scratch; the segments are then merged in order
by `_merge`. That arithmetic is the same for a row whatever shares its tile, its step or its launch:

- decode steps (every sequence has one new token) run the segments of a row in parallel programs
  (`SPLIT`), store the partial states in float32 and merge them in a second kernel: long contexts use
  the whole GPU at batch 1;
- other steps run the segments of a tile one after another in one program, merging as they go.

Both paths call the same `_segment` and `_merge`, with the same BLOCK_M, BLOCK_N and SEGMENT, and are
compiled without floating-point contraction, so a token computes the same bits decoded alone, decoded
among 63 others, or recomputed inside a prefill after preemption. Keys past a row's position (and rows
that are padding) are masked to -inf, which leaves every running state exactly unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from phi4.model.attention import AttentionMetadata, PagedAttention

LOG2_E = 1.4426950408889634


@triton.jit
def _segment(q, seq, kv_head, row_pos, row_valid, seg_start, seg_end, k_cache, v_cache, block_tables,
             block_table_stride, slot_stride, head_stride, head_dim, scale_log2e,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             PRECISION: tl.constexpr):
    """Softmax state of rows q [BLOCK_M, HEAD_DIM] over keys [seg_start, seg_end), from scratch."""
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dims = tl.arange(0, HEAD_DIM)
    for first_key in range(seg_start, seg_end, BLOCK_N):
        key_pos = first_key + tl.arange(0, BLOCK_N)
        key_valid = key_pos < seg_end
        block = tl.load(block_tables + seq * block_table_stride + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + key_pos % BLOCK_SIZE
        offsets = slot[:, None] * slot_stride + kv_head * head_stride + dims[None, :]
        loaded = key_valid[:, None] & (dims < head_dim)[None, :]
        keys = tl.load(k_cache + offsets, mask=loaded, other=0.0)
        values = tl.load(v_cache + offsets, mask=loaded, other=0.0)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale_log2e
        allowed = (key_pos[None, :] <= row_pos[:, None]) & key_valid[None, :] & row_valid[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no key yet stays at zero
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(running_max - safe_max)
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
        running_max = new_max
    return running_max, running_sum, acc


@triton.jit
def _merge(max_a, sum_a, acc_a, max_b, sum_b, acc_b):
    new_max = tl.maximum(max_a, max_b)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    scale_a = tl.exp2(max_a - safe_max)
    scale_b = tl.exp2(max_b - safe_max)
    return new_max, sum_a * scale_a + sum_b * scale_b, acc_a * scale_a[:, None] + acc_b * scale_b[:, None]


@triton.jit
def _tile_rows(tile, tile_seq, tile_first, query_lens, context_lens, query_starts,
               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SEGMENT: tl.constexpr):
    """Which sequence, rows and positions a tile covers, and how many key segments it needs."""
    seq = tl.load(tile_seq + tile)
    first = tl.load(tile_first + tile)
    query_len = tl.load(query_lens + seq)
    context_len = tl.load(context_lens + seq)
    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    row_valid = (token < query_len) & (head_in_group < GROUP)
    row_pos = context_len - query_len + token
    last_key = context_len - query_len + tl.minimum(first + BLOCK_M // GROUP_PAD, query_len) - 1
    query_row = tl.load(query_starts + seq) + token
    return seq, head_in_group, row_valid, row_pos, query_row, last_key, last_key // SEGMENT + 1


@triton.jit(do_not_specialize=["max_segments"])
def _paged_attention_kernel(
    q_ptr, out_ptr, k_cache, v_cache, block_tables, context_lens, query_lens, query_starts, tile_seq, tile_first,
    part_max, part_sum, part_acc,
    q_token_stride, q_head_stride, out_token_stride, out_head_stride, slot_stride, head_stride, head_dim,
    block_table_stride, max_segments, scale_log2e,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SEGMENT: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, head_in_group, row_valid, row_pos, query_row, last_key, num_segments = _tile_rows(
        tile, tile_seq, tile_first, query_lens, context_lens, query_starts, GROUP, GROUP_PAD, BLOCK_M, SEGMENT)
    dims = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + head_in_group
    q = tl.load(q_ptr + query_row[:, None] * q_token_stride + head[:, None] * q_head_stride + dims[None, :],
                mask=row_valid[:, None] & (dims < head_dim)[None, :], other=0.0)
    rows = tl.arange(0, BLOCK_M)
    if SPLIT:
        segment = tl.program_id(2)
        if segment < num_segments:
            seg_start = segment * SEGMENT
            seg_end = tl.minimum(seg_start + SEGMENT, last_key + 1)
            seg_max, seg_sum, seg_acc = _segment(
                q, seq, kv_head, row_pos, row_valid, seg_start, seg_end, k_cache, v_cache, block_tables,
                block_table_stride, slot_stride, head_stride, head_dim, scale_log2e, BLOCK_M, BLOCK_N, HEAD_DIM,
                BLOCK_SIZE, PRECISION)
            base = ((tile * tl.num_programs(1) + kv_head) * max_segments + segment) * BLOCK_M + rows
            tl.store(part_max + base, seg_max)
            tl.store(part_sum + base, seg_sum)
            tl.store(part_acc + base[:, None] * HEAD_DIM + dims[None, :], seg_acc)
    else:
        run_max, run_sum, run_acc = _segment(
            q, seq, kv_head, row_pos, row_valid, 0, tl.minimum(SEGMENT, last_key + 1), k_cache, v_cache,
            block_tables, block_table_stride, slot_stride, head_stride, head_dim, scale_log2e, BLOCK_M, BLOCK_N,
            HEAD_DIM, BLOCK_SIZE, PRECISION)
        for segment in range(1, num_segments):
            seg_start = segment * SEGMENT
            seg_max, seg_sum, seg_acc = _segment(
                q, seq, kv_head, row_pos, row_valid, seg_start, tl.minimum(seg_start + SEGMENT, last_key + 1),
                k_cache, v_cache, block_tables, block_table_stride, slot_stride, head_stride, head_dim, scale_log2e,
                BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_SIZE, PRECISION)
            run_max, run_sum, run_acc = _merge(run_max, run_sum, run_acc, seg_max, seg_sum, seg_acc)
        out = run_acc / tl.where(row_valid, run_sum, 1.0)[:, None]
        tl.store(out_ptr + query_row[:, None] * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dims < head_dim)[None, :])


@triton.jit(do_not_specialize=["max_segments"])
def _merge_segments_kernel(
    out_ptr, context_lens, query_lens, query_starts, tile_seq, tile_first, part_max, part_sum, part_acc,
    out_token_stride, out_head_stride, head_dim, max_segments,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, head_in_group, row_valid, row_pos, query_row, last_key, num_segments = _tile_rows(
        tile, tile_seq, tile_first, query_lens, context_lens, query_starts, GROUP, GROUP_PAD, BLOCK_M, SEGMENT)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base = (tile * tl.num_programs(1) + kv_head) * max_segments * BLOCK_M + rows
    run_max = tl.load(part_max + base)
    run_sum = tl.load(part_sum + base)
    run_acc = tl.load(part_acc + base[:, None] * HEAD_DIM + dims[None, :])
    for segment in range(1, num_segments):
        at = base + segment * BLOCK_M
        run_max, run_sum, run_acc = _merge(run_max, run_sum, run_acc, tl.load(part_max + at), tl.load(part_sum + at),
                                           tl.load(part_acc + at[:, None] * HEAD_DIM + dims[None, :]))
    out = run_acc / tl.where(row_valid, run_sum, 1.0)[:, None]
    head = kv_head * GROUP + head_in_group
    tl.store(out_ptr + query_row[:, None] * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dims < head_dim)[None, :])


def block_table_rows(block_tables: list[list[int]], context_lens: list[int], block_size: int) -> list[list[int]]:
    """Each sequence's blocks up to its context, padded with block 0 to the longest: one rectangular table.

    The kernels never read past a sequence's context, so the padding is never looked at.
    """
    needed = [-(-context_len // block_size) for context_len in context_lens]
    width = max(needed, default=0)
    return [blocks[:count] + [0] * (width - count) for blocks, count in zip(block_tables, needed)]


@dataclass
class TritonPlan:
    """One step's index tensors, shared by every layer."""

    block_tables: torch.Tensor  # [S, max blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_lens: torch.Tensor
    query_starts: torch.Tensor
    tile_seq: torch.Tensor  # [tiles] the sequence of each tile
    tile_first: torch.Tensor  # [tiles] its first query token, counted within the sequence
    split: bool  # a decode step: segments in parallel programs, then a merge kernel
    max_segments: int
    block_size: int


class TritonPagedAttention(PagedAttention):
    """The GPU backend: same interface and cache layout as the torch backends in attention.py."""

    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, segment: int = 512,
                 block_n: int = 64) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.padded_head_dim = max(16, triton.next_power_of_2(head_dim))  # Phi-4-mini's 96 runs as 128, masked
        self.group_pad = triton.next_power_of_2(self.group)
        self.block_m = max(16, self.group_pad)  # tl.dot needs 16 rows; the same for every launch
        self.tokens_per_tile = self.block_m // self.group_pad
        if segment % block_n:
            raise ValueError("the segment must be a whole number of key tiles")
        self.segment = segment
        self.block_n = block_n
        self.scale_log2e = head_dim**-0.5 * LOG2_E

    def plan(self, metadata: AttentionMetadata, dtype: torch.dtype | None = None) -> TritonPlan:
        device, size = metadata.device, metadata.block_size
        query_lens, context_lens = metadata.query_lens, metadata.context_lens
        tables = block_table_rows(metadata.block_tables, context_lens, size)
        tile_seq: list[int] = []
        tile_first: list[int] = []
        for index, query_len in enumerate(query_lens):
            for first in range(0, query_len, self.tokens_per_tile):
                tile_seq.append(index)
                tile_first.append(first)
        starts = [0]
        for query_len in query_lens[:-1]:
            starts.append(starts[-1] + query_len)

        def ints(values: list[Any]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        return TritonPlan(
            block_tables=ints(tables), context_lens=ints(context_lens), query_lens=ints(query_lens),
            query_starts=ints(starts), tile_seq=ints(tile_seq), tile_first=ints(tile_first),
            split=all(q == 1 for q in query_lens), max_segments=-(-max(context_lens) // self.segment),
            block_size=size,
        )

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TritonPlan) -> torch.Tensor:
        out = torch.empty_like(q)
        tiles = plan.tile_seq.shape[0]
        if tiles == 0:
            return out
        q_rows = q.stride(0), q.stride(1)
        common: dict[str, Any] = {
            "GROUP": self.group, "GROUP_PAD": self.group_pad, "BLOCK_M": self.block_m, "HEAD_DIM": self.padded_head_dim,
            "SEGMENT": self.segment,
        }
        # float32 products exactly as written (no TF32), so that float32 runs compare with the reference
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        if plan.split:
            rows = tiles * self.num_kv_heads * plan.max_segments * self.block_m
            part_max = torch.empty(rows, device=q.device, dtype=torch.float32)
            part_sum = torch.empty_like(part_max)
            part_acc = torch.empty(rows, self.padded_head_dim, device=q.device, dtype=torch.float32)
        else:
            part_max = part_sum = part_acc = out  # unused
        _paged_attention_kernel[(tiles, self.num_kv_heads, plan.max_segments if plan.split else 1)](
            q, out, k_cache, v_cache, plan.block_tables, plan.context_lens, plan.query_lens, plan.query_starts,
            plan.tile_seq, plan.tile_first, part_max, part_sum, part_acc,
            *q_rows, out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), self.head_dim,
            plan.block_tables.stride(0), plan.max_segments, self.scale_log2e,
            BLOCK_N=self.block_n, BLOCK_SIZE=plan.block_size, SPLIT=plan.split, PRECISION=precision,
            enable_fp_fusion=False, **common,
        )
        if plan.split:
            _merge_segments_kernel[(tiles, self.num_kv_heads)](
                out, plan.context_lens, plan.query_lens, plan.query_starts, plan.tile_seq, plan.tile_first,
                part_max, part_sum, part_acc, out.stride(0), out.stride(1), self.head_dim, plan.max_segments,
                enable_fp_fusion=False, **common,
            )
        return out
