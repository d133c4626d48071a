"""The offline Python API: `LLM(model).generate(prompts, params)`, `.chat(messages, params)`, `.stream(...)`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch

from phi4.config import EngineConfig
from phi4.engine.engine import LLMEngine
from phi4.engine.request import CompletionResult, RequestOutput
from phi4.engine.sampling import TokenLogprob
from phi4.model.loader import resolve_checkpoint
from phi4.sampling_params import SamplingParams
from phi4.tokenizer import Tokenizer

Prompt = Union[str, list[int]]
Messages = list[dict[str, Any]]


class LLM:
    """A Phi-3-family checkpoint behind a continuously batched engine.

    `model` is `"demo"`, a local Hugging Face-format directory, or a Hub id. Engine options
    (`max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `num_kv_blocks`, `block_size`,
    `enable_prefix_caching`, `kv_cache_memory_bytes`, `gpu_memory_utilization`) are EngineConfig's fields.
    """

    def __init__(self, model: str = "demo", device: str = "auto", dtype: str = "auto",
                 weights: Mapping[str, torch.Tensor] | None = None, **engine_options: Any) -> None:
        self.checkpoint = resolve_checkpoint(model)
        self.engine = LLMEngine(self.checkpoint, EngineConfig(**engine_options), device=device, dtype=dtype,
                                weights=weights)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionResult]:
        """Generate for every prompt (strings or token-id lists) at once; results in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        request_ids = self._add_all(prompt_list, params)
        tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
        texts: dict[str, list[str]] = {rid: [] for rid in request_ids}
        logprobs: dict[str, list[TokenLogprob]] = {rid: [] for rid in request_ids}
        final: dict[str, RequestOutput] = {}
        prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        for output in self._drain(request_ids):
            if output.prompt_logprobs is not None:
                prompt_logprobs[output.request_id] = output.prompt_logprobs
            tokens[output.request_id].extend(output.new_token_ids)
            texts[output.request_id].append(output.new_text)
            logprobs[output.request_id].extend(output.new_logprobs)
            if output.finished:
                final[output.request_id] = output
        return [
            CompletionResult(
                rid, final[rid].prompt_token_ids, tokens[rid], "".join(texts[rid]), final[rid].finish_reason or "stop",
                logprobs[rid] or None, final[rid].error, prompt_logprobs.get(rid),
            )
            for rid in request_ids
        ]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's new tokens and text as every engine step produces them."""
        request_ids = self._add_all(_as_prompt_list(prompts), params)
        try:
            yield from self._drain(request_ids)
        finally:  # the consumer stopped early: free what is still running
            for rid in request_ids:
                self.engine.abort_request(rid)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[CompletionResult]:
        """Apply the checkpoint's chat template to one conversation or several, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, **template_kwargs))
            for conv in conversations
        ]
        return self.generate(prompts, params)

    def _add_all(self, prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        added: list[str] = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                added.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return added

    def _drain(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        """Step the engine until these requests finish, yielding their outputs."""
        pending = set(request_ids)
        while pending:
            for output in self.engine.step():
                if output.request_id in pending:
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
