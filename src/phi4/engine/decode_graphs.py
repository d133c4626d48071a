"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a 14B model launches about 500 kernels; at batch 1 their launch cost alone would eat
most of the step. So a step whose sequences all decode one token runs on static buffers padded to the
next bucket (1, 2, 4, 8, 16, 24, 32, ...): the first step of each bucket runs eagerly (compiling the
Triton kernels), is captured, and from then on each step is one copy of its inputs and one replay.

Padding rows decode token 0 at no position: their query length is 0, so attention skips them, and they
write their K/V into a scratch slot that no sequence owns. Every kernel computes a row the same way
whatever the number of rows, so padding never changes a real row's bits. Off CUDA (the Triton
interpreter, in tests) the same static path runs eagerly.
"""

from __future__ import annotations

import torch

from phi4.model.attention import AttentionMetadata
from phi4.model.phi3 import Phi3ForCausalLM
from phi4.model.triton_attention import TritonPagedAttention, TritonPlan, block_table_rows

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: Phi3ForCausalLM, kv_caches: torch.Tensor, block_size: int, max_model_len: int,
                 max_batch: int, scratch_slot: int) -> None:
        attention = model.attention
        assert isinstance(attention, TritonPagedAttention), "decode graphs run on the Triton attention"
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        self.capture = kv_caches.is_cuda
        device = kv_caches.device
        largest = self.buckets[-1]
        self.width = -(-max_model_len // block_size)
        # Rows: input ids, rotary rows, slots (the model's inputs); then the attention's int32 lengths: context,
        # and query (1, or 0 for padding).
        self.step = torch.zeros(3, largest, dtype=torch.long, device=device)
        self.lengths = torch.zeros(2, largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, self.width, dtype=torch.int32, device=device)
        self.query_starts = torch.arange(largest, dtype=torch.int32, device=device)
        self.tile_first = torch.zeros(largest, dtype=torch.int32, device=device)
        self.max_segments = -(-max_model_len // attention.segment)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def captured(self, rows: int) -> bool:
        return not self.capture or self.bucket(rows) in self.graphs

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def run(self, input_ids: list[int], rope_rows: list[int], slots: list[int], block_tables: list[list[int]],
            context_lens: list[int]) -> torch.Tensor:
        """Final hidden states [rows, hidden] of one decode step."""
        rows = len(input_ids)
        size = self.bucket(rows)
        padding = size - rows
        step = torch.tensor([input_ids + [0] * padding, rope_rows + [0] * padding,
                             slots + [self.scratch_slot] * padding], dtype=torch.long)
        lengths = torch.tensor([context_lens + [0] * padding, [1] * rows + [0] * padding], dtype=torch.int32)
        # Only as many columns as the longest context needs: the kernels never read a row past its context,
        # so what earlier steps left further right does not matter.
        table_rows = block_table_rows(block_tables + [[]] * padding, context_lens + [0] * padding, self.block_size)
        tables = torch.tensor(table_rows, dtype=torch.int32)
        if self.capture:
            step, lengths, tables = step.pin_memory(), lengths.pin_memory(), tables.pin_memory()
        self.step[:, :size].copy_(step, non_blocking=True)
        self.lengths[:, :size].copy_(lengths, non_blocking=True)
        self.block_tables[:size, : tables.shape[1]].copy_(tables, non_blocking=True)
        if not self.capture:
            return self._forward(size)[:rows]
        if size not in self.graphs:
            self._forward(size)  # eager first: Triton compiles its kernels for this bucket outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the grammar-mask thread may touch the GPU meanwhile without breaking the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        self.graphs[size].replay()
        return self.outputs[size][:rows]

    def _forward(self, size: int) -> torch.Tensor:
        plan = TritonPlan(
            block_tables=self.block_tables[:size], context_lens=self.lengths[0, :size],
            query_lens=self.lengths[1, :size], query_starts=self.query_starts[:size],
            tile_seq=self.query_starts[:size], tile_first=self.tile_first[:size], split=True,
            max_segments=self.max_segments, block_size=self.block_size,
        )
        metadata = AttentionMetadata(self.step[2, :size], [1] * size, [], [], self.block_size,
                                     backend_plans={"triton": plan})
        return self.model.forward(self.step[0, :size], self.step[1, :size], self.kv_caches, metadata)
