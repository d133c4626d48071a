"""What chat and text completions share: sampling parameters and grammars from a request, running the n
choices of one or more prompts concurrently, and the OpenAI shapes of logprobs and usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from phi4.engine.client import EngineClient, OutputStream, PreparedRequest, RequestOutput, TokenLogprob
from phi4.errors import InvalidRequestError
from phi4.sampling_params import SamplingParams
from phi4.server.metrics import Metrics
from phi4.server.protocol import SamplingFields
from phi4.structured.grammars import GrammarSpec, from_structured_outputs
from phi4.tokenizer import Tokenizer


def output_grammar(request: SamplingFields) -> GrammarSpec | None:
    """The grammar `response_format` or `structured_outputs` asks for (compiled when the request is prepared)."""
    response_format = request.response_format
    spec = request.structured_outputs
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and spec is not None:
        raise InvalidRequestError("give response_format or structured_outputs, not both", "structured_outputs")
    if response_format is not None and response_format.type == "json_object":
        return GrammarSpec("json_object", None, "response_format")
    if response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise InvalidRequestError("json_schema needs a schema", "response_format.json_schema")
        return GrammarSpec("json_schema", response_format.json_schema.schema_, "response_format")
    if spec is not None:
        return from_structured_outputs(spec.model_dump(by_alias=True))
    return None


def sampling_params(request: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    max_stop_sequences: int, prompt_logprobs: int | None = None) -> SamplingParams:
    stops = tuple(request.stop or ())
    if len(stops) > max_stop_sequences:
        raise InvalidRequestError(f"at most {max_stop_sequences} stop sequences are allowed (this server's "
                                  f"--max-stop-sequences), got {len(stops)}", "stop")
    return SamplingParams(
        temperature=1.0 if request.temperature is None else float(request.temperature),
        top_p=1.0 if request.top_p is None else float(request.top_p),
        top_k=max(request.top_k or 0, 0),  # -1 and 0 both mean: no top-k
        min_p=float(request.min_p or 0.0),
        max_tokens=max_tokens,
        stop=stops,
        seed=request.seed,
        frequency_penalty=float(request.frequency_penalty or 0.0),
        presence_penalty=float(request.presence_penalty or 0.0),
        repetition_penalty=float(request.repetition_penalty or 1.0),
        logit_bias={int(k): float(v) for k, v in (request.logit_bias or {}).items()},
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=request.ignore_eos,
    )


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
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.new_token_ids)
        self.text.append(output.new_text)
        self.logprobs.extend(output.new_logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finish_reason = output.finish_reason


def all_finished(choices: list[ChoiceState]) -> bool:
    return all(choice.finish_reason is not None for choice in choices)


def one_write(events: list[str]) -> str:
    """The server-sent events that are ready together, as one piece for the socket (and `events` emptied): each
    engine output's events (its text and its finish), and the last ones with the usage and [DONE]. Each piece a
    stream yields is one pass through the ASGI middleware and one system call (in a fleet's ingress under load, about
    15 % of py-spy's samples were in those writes)."""
    text = "".join(events)
    events.clear()
    return text


@dataclass
class ChoiceRun:
    """The choices of one HTTP request, submitted to the engine at once (so that the queue counts them from
    the start) and read concurrently, with timing for the metrics."""

    engine: EngineClient
    metrics: Metrics
    request_id: str
    choices: list[PreparedRequest]
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    streams: list[OutputStream] = field(init=False)

    def __post_init__(self) -> None:
        self.streams = [self.engine.generate(f"{self.request_id}-{i}", c) for i, c in enumerate(self.choices)]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) as outputs arrive; leaving early (or failing) aborts every choice."""
        if len(self.streams) == 1:  # the common case: no merging needed
            try:
                async for output in self.streams[0]:
                    self._observe(output)
                    yield 0, output
            finally:
                self.close()
            return
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self.streams[index]:
                    await merged.put((index, output))
                await merged.put((index, None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer, which raises it
                await merged.put((index, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.streams))]
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
            self.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

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


def usage(prompt_tokens: int, choices: list[ChoiceState], prompts: int = 1) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens` counts each prompt once (its first choice), as the prompt tokens do."""
    completion = sum(len(c.token_ids) for c in choices)
    per_prompt = max(1, len(choices) // prompts)
    cached = sum(c.cached_tokens for c in choices[::per_prompt])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def vllm_prompt_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first None) its own and the most likely tokens there,
    keyed by token id, each with its log-probability, rank and text."""
    def item(token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(tokenizer, token_id)}

    rendered: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            rendered.append(None)
            continue
        top = {str(t): item(t, lp, rank) for rank, (t, lp) in enumerate(entry.top, start=1)}
        top[str(entry.token_id)] = item(entry.token_id, entry.logprob, entry.rank)
        rendered.append(top)
    return rendered


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes[token_id].decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes[token_id])}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], text_start: int,
                        prompt: list[int] | None = None,
                        prompt_entries: list[TokenLogprob | None] | None = None) -> dict[str, Any]:
    """The legacy logprobs object; with echo, the prompt's tokens come first (the very first without a
    log-probability), as vLLM and the original API return them."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0 if prompt is not None else text_start
    for token_id, entry in zip(prompt or [], prompt_entries or []):
        tokens.append(token_text(tokenizer, token_id))
        token_logprobs.append(None if entry is None else entry.logprob)
        top_logprobs.append(None if entry is None else {token_text(tokenizer, t): lp for t, lp in entry.top})
        offsets.append(offset)
        offset += len(tokens[-1])
    for e in entries:
        tokens.append(token_text(tokenizer, e.token_id))
        token_logprobs.append(e.logprob)
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
