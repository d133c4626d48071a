"""The engine: requests in, one scheduled batch per step, outputs (deltas) back out.

A step reads schedule -> execute -> process. Only a failure of the forward pass ends every request of that
step; anything that goes wrong for one request (sampling, its grammar, its text) ends that request alone,
with an error its client sees, and the step goes on for the others.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from phi4.config import EngineConfig, ModelConfig
from phi4.engine.kv_cache import BlockManager
from phi4.engine.output import OutputProcessor, RequestState, output
from phi4.engine.request import RequestOutput, Sequence, SequenceStatus
from phi4.engine.runner import ModelRunner, kv_bytes_per_block
from phi4.engine.scheduler import ScheduledSequence, Scheduler
from phi4.errors import ContextLengthExceededError, InvalidRequestError
from phi4.model.loader import load_model
from phi4.sampling_params import SamplingParams
from phi4.structured.service import CompiledGrammar, GrammarService
from phi4.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("phi4.engine")


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


def validate_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Everything about a request that must hold before it is queued; a problem is a typed error naming it."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:  # C loops: a 16K-token prompt costs microseconds
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if len(prompt_ids) >= max_model_len:
        raise ContextLengthExceededError(len(prompt_ids), max_model_len)
    if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_model_len:
        raise ContextLengthExceededError(len(prompt_ids), max_model_len, params.max_tokens)
    if any(not 0 <= t < vocab_size for t in params.logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise InvalidRequestError(f"stop token ids must be in [0, {vocab_size})", "stop_token_ids")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine publishes after every step, for readers on other threads."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_free_blocks: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0


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
        self.grammars = GrammarService(checkpoint / "tokenizer.json", config.vocab_size, self.eos_token_ids,
                                       self.tokenizer.token_bytes)
        self.runner = ModelRunner(self.model, self.grammars, num_blocks, block_size, self.max_model_len,
                                  engine_config.max_num_seqs, engine_config.cuda_graphs)
        self.outputs = OutputProcessor(self.eos_token_ids, self.max_model_len)
        self.checkpoint = checkpoint
        self._sequences: dict[str, Sequence] = {}
        self._states: dict[str, RequestState] = {}
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
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
    ) -> str:
        """Validate and queue a request; its grammar is `params.grammar`, compiled here."""
        params = params or SamplingParams()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        grammar = self.grammars.compile(params.grammar) if params.grammar is not None else None
        if request_id is None:
            request_id = f"req-{self._next_request_id}"
            self._next_request_id += 1
        return self.add_prepared(request_id, prompt_ids, params, grammar)

    def add_prepared(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     grammar: CompiledGrammar | None) -> str:
        """Queue a request validated and compiled already (by the engine client's preparer, off this thread)."""
        if request_id in self._sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id=request_id, prompt_token_ids=prompt_ids, params=params, seed=seed)
        self._states[request_id] = RequestState(
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            self.grammars.constraint(grammar) if grammar is not None else None,
        )
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the typed error that `add_request` would raise for this request, without adding it."""
        validate_request(prompt_ids, params, self.model_config.vocab_size, self.max_model_len)

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every prompt position, from one prefill: for measuring
        the model (equivalence, quantization error). It runs outside the scheduler, so only on an idle
        engine; its blocks come from the allocator and go back to it uncached."""
        if self.has_unfinished_requests():
            raise RuntimeError("prompt_logits needs an idle engine")
        self.validate(prompt_ids, SamplingParams(max_tokens=1))
        seq = Sequence("prompt-logits", list(prompt_ids), SamplingParams(max_tokens=1), 0)
        self.block_manager.reserve(seq, len(prompt_ids))
        try:
            batch = self.runner.prepare([ScheduledSequence(seq, len(prompt_ids))])
            return self.model.compute_logits(self.runner.forward(batch))
        finally:
            self.block_manager.free(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        return self._end(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.usage,
                           self.block_manager.num_free_blocks, self.scheduler.num_preemptions,
                           self.block_manager.prefix_hit_tokens)

    # the loop

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        sampling = [item.seq for item in scheduled if item.samples]
        try:
            result = self.runner.execute(scheduled, [self._states[seq.request_id].constraint for seq in sampling])
        except Exception as exc:  # the forward pass itself: this step's requests end; the engine goes on
            logger.exception("a step of %d sequences failed; ending them", len(scheduled))
            return [self._end(item.seq, "error", f"the engine failed on this request's step: {exc!r}")
                    for item in scheduled]
        self.scheduler.finish_step(scheduled)
        for seq in (item.seq for item in scheduled):
            if seq.request_id in result.prompt_logprobs:
                if not seq.prompt_logprobs:
                    seq.prompt_logprobs.append(None)  # the first prompt token has nothing before it
                seq.prompt_logprobs.extend(result.prompt_logprobs[seq.request_id])
        outputs = []
        for seq, token, logprob, error in zip(sampling, result.token_ids, result.logprobs, result.errors, strict=True):
            if error is not None:
                logger.error("request %s failed: %s", seq.request_id, error)
                outputs.append(self._end(seq, "error", error))
                continue
            if seq.params.max_tokens == 0:  # only the prompt's log-probabilities were asked for
                outputs.append(self._end(seq, "length"))
                continue
            seq.token_ids.append(token)
            try:
                item = self.outputs.process(seq, self._states[seq.request_id], token, logprob)
            except Exception as exc:  # noqa: BLE001 - this request's text or grammar: it alone ends
                logger.exception("request %s failed while its output was processed", seq.request_id)
                item = self._end(seq, "error", f"processing the output failed: {exc}")
            else:
                if item.finished:
                    self._remove(seq)
            outputs.append(item)
        return outputs

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        """Finish a request without a new token (aborted, failed, or asked for none): free it and say so."""
        self._remove(seq)
        return output(seq, [], "", [], reason, error)

    def _remove(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._sequences.pop(seq.request_id, None)
        self._states.pop(seq.request_id, None)
