"""What chat and text completions share: sampling parameters from a request, running the n choices of
one or more prompts concurrently, and the OpenAI shapes of logprobs and usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import llguidance

from phi4.engine.async_engine import AsyncEngine
from phi4.engine.request import RequestOutput
from phi4.engine.sampling import TokenLogprob
from phi4.errors import ContextLengthExceededError, InvalidRequestError
from phi4.sampling_params import SamplingParams
from phi4.server.metrics import Metrics
from phi4.structured import grammars
from phi4.server.protocol import SamplingFields
from phi4.tokenizer import Tokenizer


def constrained(request: SamplingFields) -> bool:
    format_ = request.response_format
    return (format_ is not None and format_.type != "text") or request.structured_outputs is not None


def output_grammar(request: SamplingFields, tokenizer: llguidance.LLTokenizer) -> str | None:
    """The grammar that `response_format` or `structured_outputs` asks for, compiled and checked."""
    response_format = request.response_format
    spec = request.structured_outputs
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and spec is not None:
        raise InvalidRequestError("give response_format or structured_outputs, not both", "structured_outputs")
    param = "response_format" if wants_format else "structured_outputs"
    try:
        if response_format is not None and response_format.type == "json_object":
            grammar = grammars.json_object_grammar()
        elif response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                raise InvalidRequestError("json_schema needs a schema", "response_format.json_schema")
            grammar = grammars.json_schema_grammar(response_format.json_schema.schema_)
        elif spec is not None:
            grammar = grammars.from_structured_outputs(spec.model_dump(by_alias=True))
        else:
            return None
    except InvalidRequestError:
        raise
    except Exception as exc:  # llguidance's own complaint about the schema, regex or grammar
        raise InvalidRequestError(f"the {param} cannot be compiled: {exc}", param) from exc
    grammars.check(grammar, tokenizer, param)
    return grammar


def sampling_params(
    request: SamplingFields, max_tokens: int | None, logprobs: int | None, seed: int | None,
    grammar: str | None = None,
) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if request.temperature is None else float(request.temperature),
        top_p=1.0 if request.top_p is None else float(request.top_p),
        top_k=max(request.top_k or 0, 0),  # -1 and 0 both mean: no top-k
        min_p=float(request.min_p or 0.0),
        max_tokens=max_tokens,
        stop=tuple(request.stop or ()),
        seed=seed,
        frequency_penalty=float(request.frequency_penalty or 0.0),
        presence_penalty=float(request.presence_penalty or 0.0),
        repetition_penalty=float(request.repetition_penalty or 1.0),
        logit_bias={int(k): float(v) for k, v in (request.logit_bias or {}).items()},
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
        grammar=grammar,
    )


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthExceededError(num_prompt_tokens, max_model_len)
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        error = ContextLengthExceededError(num_prompt_tokens + max_tokens, max_model_len)
        error.args = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or the completion length.",
        )
        raise error


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i: choice 0 equals the same request with n=1."""
    return None if seed is None else seed + index


@dataclass
class ChoiceState:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.new_token_ids)
        self.text.append(output.new_text)
        self.logprobs.extend(output.new_logprobs)
        if output.finished:
            self.finish_reason = output.finish_reason


@dataclass
class ChoiceRun:
    """The n choices of one HTTP request, run concurrently, with timing for the metrics."""

    engine: AsyncEngine
    metrics: Metrics
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    async def run(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) as outputs arrive; leaving early aborts every choice."""
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                rid = f"{self.request_id}-{index}"
                async for output in self.engine.generate(rid, prompts[index], params[index]):
                    await merged.put((index, output))
                await merged.put((index, None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # reported to the consumer, which raises it
                await merged.put((index, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await merged.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._observe(item)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, output: RequestOutput) -> None:
        if not output.new_token_ids:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.observe_ttft(now - self.started)
        elif self.last_token_at is not None:
            self.metrics.observe_itl(now - self.last_token_at)
        self.last_token_at = now


def usage(prompt_tokens: int, choices: list[ChoiceState]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes[token_id].decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes[token_id])}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], text_start: int) -> dict[str, Any]:
    tokens, offsets, offset = [], [], text_start
    for e in entries:
        tokens.append(token_text(tokenizer, e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}
