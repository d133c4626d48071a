"""The engine: requests in, one scheduled batch per step, outputs (deltas) back out."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

import llguidance
import torch

from phi4.config import EngineConfig, ModelConfig
from phi4.engine.kv_cache import BlockManager
from phi4.engine.request import RequestOutput, Sequence, SequenceStatus
from phi4.engine.runner import ModelRunner, kv_bytes_per_block
from phi4.engine.sampling import TokenLogprob
from phi4.engine.scheduler import Scheduler
from phi4.errors import ContextLengthExceededError, InvalidRequestError
from phi4.model.attention import AttentionMetadata
from phi4.model.loader import load_model
from phi4.sampling_params import SamplingParams
from phi4.structured import grammars
from phi4.structured.constraint import ClosingTiers, GrammarConstraint
from phi4.tokenizer import IncrementalDetokenizer, Tokenizer


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype of activations and the KV cache: bf16 on GPUs (as Phi-4 is stored), float32 on CPU, where
    phi4's kernels compute as the reference does and read the weights in their stored precision."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16", "dtype")
    if device.type == "cpu" and resolved != torch.float32:
        raise InvalidRequestError(f"on CPU phi4 computes in float32 (bf16 weights are read as stored and widened "
                                  f"exactly); dtype {dtype!r} is for CUDA", "dtype")
    return resolved


class LLMEngine:
    def __init__(
        self,
        checkpoint: Path,
        engine_config: EngineConfig = EngineConfig(),
        device: str = "auto",
        dtype: str = "auto",
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = Tokenizer(checkpoint)
        self.model = load_model(checkpoint, self.device, self.dtype, engine_config.batch_invariant,
                                engine_config.quantization, engine_config.attention_backend, weights)
        self.model_config: ModelConfig = self.model.config
        config = self.model_config
        self.max_model_len = min(engine_config.max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings)
        self.eos_token_ids = frozenset(config.eos_token_ids or self.tokenizer.eos_token_ids)
        block_size = engine_config.block_size
        num_blocks = engine_config.num_kv_blocks or self._auto_num_blocks(engine_config)
        if num_blocks * block_size < self.max_model_len:
            raise InvalidRequestError(
                f"the KV cache holds {num_blocks * block_size} tokens, less than max_model_len "
                f"{self.max_model_len}: give it more memory or lower max_model_len", "max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, block_size, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, engine_config.max_num_seqs, engine_config.max_num_batched_tokens, self._cache_salt
        )
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.max_model_len,
                                  engine_config.max_num_seqs, engine_config.cuda_graphs)
        self.checkpoint = checkpoint
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None
        self._checked_grammars: set[str] = set()
        self._sequences: dict[str, Sequence] = {}
        self._next_request_id = 0

    def _auto_num_blocks(self, engine_config: EngineConfig) -> int:
        per_block = kv_bytes_per_block(self.model_config, engine_config.block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - engine_config.gpu_memory_utilization) * total
        else:
            budget = engine_config.kv_cache_memory_bytes
        return max(1, int(budget // per_block))

    def _cache_salt(self, seq: Sequence) -> object:
        # Under LongRoPE the prompt's K/V depend on whether the prompt is longer than the original context.
        longrope = self.model_config.longrope
        if longrope is None:
            return None
        return seq.num_prompt_tokens > longrope.original_max_position_embeddings

    # requests

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{self._next_request_id}"
            self._next_request_id += 1
        if request_id in self._sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            constraint=GrammarConstraint.compile(self.grammar_tokenizer, params.grammar) if params.grammar else None,
        )
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    @property
    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on the first request with a grammar (about 0.5 s)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.LLTokenizer(
                str(self.checkpoint / "tokenizer.json"), n_vocab=self.model_config.vocab_size,
                eos_token=sorted(self.eos_token_ids),
            )
            self.runner.closing_tiers = ClosingTiers(self.tokenizer.token_bytes, self.model_config.vocab_size,
                                                     self.eos_token_ids)
        return self._grammar_tokenizer

    def _check_grammar(self, grammar: str) -> None:
        # A request is validated when it is submitted (HTTP thread) and again when it is added (engine
        # thread), once per choice: compile each distinct grammar once. A plain set, emptied when large,
        # because both threads touch it and single set operations are atomic.
        if grammar in self._checked_grammars:
            return
        grammars.check(grammar, self.grammar_tokenizer, "grammar")
        if len(self._checked_grammars) >= 256:
            self._checked_grammars.clear()
        self._checked_grammars.add(grammar)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the typed error that `add_request` would raise for this request, without adding it."""
        vocab_size = self.model_config.vocab_size
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if any(not 0 <= t < vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthExceededError(len(prompt_ids), self.max_model_len)
        if any(not 0 <= t < vocab_size for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
        if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop token ids must be in [0, {vocab_size})", "stop_token_ids")
        if params.grammar is not None:
            self._check_grammar(params.grammar)

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every prompt position, from one prefill: for measuring
        the model (equivalence, quantization error). It runs outside the scheduler, so only on an idle
        engine; its blocks come from the allocator and go back to it uncached."""
        if self.has_unfinished_requests():
            raise RuntimeError("prompt_logits needs an idle engine")
        self.validate(prompt_ids, SamplingParams(max_tokens=1))
        seq = Sequence("prompt-logits", list(prompt_ids), SamplingParams(max_tokens=1), 0,
                       IncrementalDetokenizer(self.tokenizer))
        manager, runner = self.block_manager, self.runner
        manager.reserve(seq, len(prompt_ids))
        try:
            size = manager.block_size
            positions = range(len(prompt_ids))
            slots = [seq.block_table[p // size] * size + p % size for p in positions]
            metadata = AttentionMetadata.build(torch.tensor(slots, device=self.device), [len(prompt_ids)],
                                               [seq.block_table], [len(prompt_ids)], size, self.device)
            rows = torch.tensor([runner.rope_row(seq, p) for p in positions], device=self.device)
            hidden = self.model.forward(torch.tensor(prompt_ids, device=self.device), rows, runner.kv_caches, metadata)
            return self.model.compute_logits(hidden)
        finally:
            manager.free(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        self._finish(seq, "abort")
        return self._output(seq, [], "", [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # the loop

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        sampling = [item.seq for item in scheduled if item.samples]
        result = self.runner.execute(scheduled)
        self.scheduler.finish_step(scheduled)
        outputs = []
        for seq, token, logprob in zip(sampling, result.token_ids, result.logprobs, strict=True):
            seq.token_ids.append(token)
            if seq.constraint is not None:
                seq.constraint.consume(token)
            reason = self._stop_reason(seq, token)
            # The EOS or stop token that ends a request is counted but never shown as text.
            if not (reason == "stop" and (token in seq.params.stop_token_ids or token in self.eos_token_ids)):
                seq.text += seq.detokenizer.push([token])
            if reason is not None:
                seq.text += seq.detokenizer.flush()
            if seq.params.stop and (cut := _find_stop_string(seq.text, seq.params.stop, seq.num_emitted_chars)) >= 0:
                seq.text = seq.text[:cut]
                reason = "stop"
            if reason is not None:
                self.scheduler.remove(seq)
                self._sequences.pop(seq.request_id, None)
                self._finish(seq, reason)
                visible_end = len(seq.text)
            else:
                visible_end = len(seq.text) - _stop_prefix_length(seq.text, seq.params.stop, seq.num_emitted_chars)
            new_text = seq.text[seq.num_emitted_chars : visible_end]
            seq.num_emitted_chars = max(seq.num_emitted_chars, visible_end)
            outputs.append(self._output(seq, [token], new_text, [logprob] if logprob is not None else []))
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.constraint is not None and (seq.constraint.finished or token in self.eos_token_ids):
            return "stop"  # the grammar is complete (EOS under a grammar always ends it)
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _finish(seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    @staticmethod
    def _output(
        seq: Sequence, new_tokens: list[int], new_text: str, new_logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            new_logprobs=new_logprobs,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_token_ids=seq.prompt_token_ids,
            num_output_tokens=seq.num_output_tokens,
        )


def _find_stop_string(text: str, stops: tuple[str, ...], start: int) -> int:
    """Where the earliest stop string begins in text[start:] (absolute index), or -1."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found, default=-1)


def _stop_prefix_length(text: str, stops: tuple[str, ...], start: int) -> int:
    """Length of the longest tail of text[start:] that could still grow into a stop string: held back."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
