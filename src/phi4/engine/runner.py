"""The model runner: owns the KV cache tensors, turns a schedule into one flat batch, runs the model."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from phi4.config import ModelConfig
from phi4.engine.request import Sequence
from phi4.engine.sampling import SampleResult, SamplingRow, TokenLogprob, sample_isolated, token_logprobs
from phi4.engine.scheduler import ScheduledSequence
from phi4.model.attention import AttentionMetadata
from phi4.model.phi3 import Phi3ForCausalLM
from phi4.structured.constraint import CLOSING_TOKENS, BatchMasks, Constraint
from phi4.structured.service import GrammarService

if TYPE_CHECKING:
    from phi4.engine.decode_graphs import DecodeGraphs


PROMPT_LOGPROB_ROWS = 128  # logits rows at a time: a 100k vocabulary makes each row 400 KB


@dataclass
class ForwardBatch:
    """One step as a flat batch: per token its id, rotary row and cache slot; per sequence its query length,
    block table and context length; which rows are sampled; and which rows give prompt log-probabilities."""

    input_ids: list[int] = field(default_factory=list)
    rope_rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[tuple[Sequence, list[int], list[int]]] = field(default_factory=list)  # (seq, rows, tokens)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.kv_size * element


def uses_long_rope(config: ModelConfig, seq: Sequence, position: int) -> bool:
    """LongRoPE picks its long factors when the sequence is longer than the original context.

    The reference decides per forward pass (max position + 1). We decide per token: a prompt token uses the
    long factors when the prompt does, a generated token when its own position reaches past the original
    context. That equals the reference for a prompt prefilled whole and then decoded token by token, and
    it stays the same under chunked prefill, batching and prefix caching.
    """
    assert config.longrope is not None
    return max(position + 1, seq.num_prompt_tokens) > config.longrope.original_max_position_embeddings


class ModelRunner:
    def __init__(self, model: Phi3ForCausalLM, grammars: GrammarService, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int = 256, cuda_graphs: bool = True) -> None:
        self.model = model
        self.config = model.config
        self.grammars = grammars
        self.block_size = block_size
        self.max_model_len = max_model_len
        # Grammar masks are computed on this thread while the model runs (llguidance releases the GIL).
        self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi4-masks")
        self.device, self.dtype = model.model.norm.weight.device, model.compute_dtype
        config = self.config
        # One block more than the block manager hands out: a scratch slot for padding rows to write into.
        self.kv_caches = torch.zeros(
            config.num_hidden_layers, 2, (num_blocks + 1) * block_size, config.num_key_value_heads, config.head_dim,
            device=self.device, dtype=self.dtype,
        )
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs and model.attention is not None and model.attention.name == "triton":
            from phi4.engine.decode_graphs import DecodeGraphs  # Triton is needed only here

            self.decode_graphs = DecodeGraphs(model, self.kv_caches, block_size, max_model_len, max_num_seqs,
                                              scratch_slot=num_blocks * block_size)

    def rope_row(self, seq: Sequence, position: int) -> int:
        if self.config.longrope is not None and uses_long_rope(self.config, seq, position):
            return position + self.config.max_position_embeddings
        return position

    def prepare(self, scheduled: list[ScheduledSequence]) -> ForwardBatch:
        """The step as one flat batch, built once and used by the eager path, CUDA graphs and prompt_logits."""
        batch = ForwardBatch()
        size = self.block_size
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            offset = len(batch.input_ids)
            batch.input_ids.extend(seq.token_ids[start:end])
            table = seq.block_table
            batch.slots.extend(table[position // size] * size + position % size for position in range(start, end))
            if self.config.longrope is None:
                batch.rope_rows.extend(range(start, end))  # the rotary row is the position itself
            else:
                batch.rope_rows.extend(self.rope_row(seq, position) for position in range(start, end))
            batch.query_lens.append(item.num_new_tokens)
            batch.block_tables.append(table)
            batch.context_lens.append(end)
            if item.samples:
                batch.sample_rows.append(len(batch.input_ids) - 1)
            if seq.needs_prompt_logprobs:
                # the logits at position p give prompt token p + 1: entries not yet computed that this chunk reaches
                first = max(len(seq.prompt_logprobs), 1)
                positions = range(max(first - 1, start), min(end, seq.num_prompt_tokens - 1))
                if positions:
                    batch.prompt_rows.append((seq, [offset + p - start for p in positions],
                                              [seq.token_ids[p + 1] for p in positions]))
        return batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of the batch: replayed from a CUDA graph when it is a decode step that fits."""
        graphs, device = self.decode_graphs, self.device
        rows = len(batch.query_lens)
        if graphs is not None and rows <= graphs.max_batch and len(batch.input_ids) == rows:
            return graphs.run(batch.input_ids, batch.rope_rows, batch.slots, batch.block_tables, batch.context_lens)
        metadata = AttentionMetadata.build(torch.tensor(batch.slots, device=device), batch.query_lens,
                                           batch.block_tables, batch.context_lens, self.block_size, device)
        return self.model.forward(torch.tensor(batch.input_ids, device=device),
                                  torch.tensor(batch.rope_rows, device=device), self.kv_caches, metadata)

    def execute(self, scheduled: list[ScheduledSequence], constraints: list[Constraint | None]) -> SampleResult:
        """Run one step; sample the next token of every sequence whose `samples` is true, in order, each under
        its grammar constraint (one per sampled sequence, or None), and compute the prompt log-probabilities
        the step reaches. Only a failure of the forward pass raises: a row that cannot be sampled gets its
        error in the result."""
        batch = self.prepare(scheduled)
        sampling = [item.seq for item in scheduled if item.samples]
        masks: Future[BatchMasks | None] | None = None
        if any(c is not None for c in constraints):
            masks = self._mask_worker.submit(self._grammar_masks, sampling, constraints)
            graphs = self.decode_graphs
            if graphs is not None and len(batch.input_ids) == len(scheduled) and not graphs.captured(len(scheduled)):
                masks.result()  # let the mask thread's GPU work finish before a capture begins
        hidden = self.forward(batch)
        prompt_logprobs = {seq.request_id: self._prompt_logprobs(hidden, rows, targets, seq.params.prompt_logprobs or 0)
                           for seq, rows, targets in batch.prompt_rows}
        if not batch.sample_rows:
            return SampleResult([], [], [], prompt_logprobs)
        if len(batch.sample_rows) < hidden.shape[0]:  # else a decode step: every row is sampled, in order
            hidden = hidden[torch.tensor(batch.sample_rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        rows = [SamplingRow(seq.params, seq.seed, seq.token_ids, seq.num_prompt_tokens) for seq in sampling]
        result = sample_isolated(logits, rows, masks.result() if masks is not None else None)
        return replace(result, prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: list[int], targets: list[int],
                         top: int) -> list[TokenLogprob]:
        """The LM head and log-softmax over a prefill chunk's rows, a bounded number of rows at a time."""
        entries: list[TokenLogprob] = []
        for first in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            chunk = torch.tensor(rows[first : first + PROMPT_LOGPROB_ROWS], device=self.device)
            logits = self.model.compute_logits(hidden[chunk])
            entries += token_logprobs(logits, targets[first : first + PROMPT_LOGPROB_ROWS], [top] * len(chunk))
        return entries

    def _grammar_masks(self, sampling: list[Sequence], constraints: list[Constraint | None]) -> BatchMasks | None:
        closing = [self._tokens_left(seq) <= CLOSING_TOKENS for seq in sampling]
        return self.grammars.masks(constraints, closing, self.device)

    def _tokens_left(self, seq: Sequence) -> int:
        """How many tokens the sequence may still generate, this one included."""
        left = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return left
