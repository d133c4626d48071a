"""The model runner: owns the KV cache tensors, turns a schedule into one flat batch, runs the model."""

from __future__ import annotations

import torch

from phi4.config import ModelConfig
from phi4.engine.request import Sequence
from phi4.engine.sampling import SampleResult, SamplingRow, sample
from phi4.engine.scheduler import ScheduledSequence
from phi4.model.attention import AttentionMetadata
from phi4.model.phi3 import Phi3ForCausalLM


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
    def __init__(self, model: Phi3ForCausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.config = model.config
        self.block_size = block_size
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        config = self.config
        self.kv_caches = torch.zeros(
            config.num_hidden_layers, 2, num_blocks * block_size, config.num_key_value_heads, config.head_dim,
            device=self.device, dtype=self.dtype,
        )

    def rope_row(self, seq: Sequence, position: int) -> int:
        if self.config.longrope is not None and uses_long_rope(self.config, seq, position):
            return position + self.config.max_position_embeddings
        return position

    def execute(self, scheduled: list[ScheduledSequence]) -> SampleResult:
        """Run one step; sample the next token of every sequence whose `samples` is true, in order."""
        input_ids: list[int] = []
        rope_rows: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        size = self.block_size
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            table = seq.block_table
            for position in range(start, end):
                rope_rows.append(self.rope_row(seq, position))
                slots.append(table[position // size] * size + position % size)
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        device = self.device
        metadata = AttentionMetadata.build(
            slot_mapping=torch.tensor(slots, device=device),
            query_lens=[item.num_new_tokens for item in scheduled],
            block_tables=[item.seq.block_table for item in scheduled],
            context_lens=[item.seq.num_computed_tokens + item.num_new_tokens for item in scheduled],
            block_size=size,
            device=device,
        )
        hidden = self.model.forward(
            torch.tensor(input_ids, device=device), torch.tensor(rope_rows, device=device), self.kv_caches, metadata
        )
        if not sample_rows:
            return SampleResult([], [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=device)])
        rows = [
            SamplingRow(item.seq.params, item.seq.seed, item.seq.token_ids, item.seq.num_prompt_tokens)
            for item in scheduled
            if item.samples
        ]
        return sample(logits, rows)
