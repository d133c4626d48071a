"""POST /v1/completions: the legacy text API, prompts as strings or token ids, with echo."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from phi4.engine.client import EngineRequest, TokenLogprob
from phi4.server.errors import APIError, stream_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, all_finished, choice_seed, completion_logprobs, one_write, output_grammar, sampling_params,
    usage, vllm_prompt_logprobs,
)
from phi4.server.protocol import CompletionRequest
from phi4.server.state import Reservation, ServerState


def prompts_of(request: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, token ids, or lists of token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def sequences(request: CompletionRequest) -> int:
    return len(prompts_of(request)) * request.n


async def create_completion(
    state: ServerState, request: CompletionRequest, reservation: Reservation
) -> dict[str, Any] | AsyncIterator[str]:
    if request.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    # echo with logprobs: the prompt's own log-probabilities, from the prefill (lm-eval's loglikelihood)
    prompt_logprobs = request.prompt_logprobs
    if request.echo and request.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
    if request.max_tokens == 0 and prompt_logprobs is None:
        raise APIError(400, "max_tokens 0 needs echo with logprobs, or prompt_logprobs", param="max_tokens")
    n = request.n
    params = sampling_params(request, request.max_tokens, request.logprobs, state.max_stop_sequences, prompt_logprobs)
    grammar = output_grammar(request)
    prepared = [await state.engine.prepare(EngineRequest(prompt, params, grammar)) for prompt in prompts_of(request)]
    request_id = state.engine.new_request_id("cmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id,
                    [p.with_seed(choice_seed(request.seed, j)) for p in prepared for j in range(n)])
    reservation.release()  # the engine counts them now
    choices = [ChoiceState(i * n + j, p.prompt_token_ids) for i, p in enumerate(prepared) for j in range(n)]
    view = CompletionView(state, request, [state.tokenizer.decode(p.prompt_token_ids) if request.echo else ""
                                           for p in prepared])
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()),
              "model": state.served_model_name, "system_fingerprint": state.system_fingerprint}
    prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = _stream(state, header, run, choices, view, prompt_tokens, len(prepared), include_usage)
        weakref.finalize(stream, run.close)  # a client gone before the stream begins: nothing else closes it
        return stream
    async for index, output in run.outputs():
        choices[index].add(output)
    state.finish_request(request_id, prompt_tokens, choices, run)
    return {**header, "choices": [view.whole(c) for c in choices],
            "usage": usage(prompt_tokens, choices, len(prepared))}


class CompletionView:
    """How a choice reads in the legacy shape: echo, logprobs (the prompt's too, with echo), prompt_logprobs."""

    def __init__(self, state: ServerState, request: CompletionRequest, echoes: list[str]) -> None:
        self.tokenizer = state.tokenizer
        self.request = request
        self.echoes = echoes

    def echo(self, choice: ChoiceState) -> str:
        return self.echoes[choice.index // self.request.n]

    def logprobs(self, choice: ChoiceState, entries: list[TokenLogprob], text_start: int,
                 with_prompt: bool) -> dict[str, Any] | None:
        if self.request.logprobs is None:
            return None
        prompt = choice.prompt_token_ids if with_prompt and self.request.echo else None
        return completion_logprobs(self.tokenizer, entries, text_start, prompt, choice.prompt_logprobs)

    def extras(self, choice: ChoiceState) -> dict[str, Any]:
        if self.request.prompt_logprobs is None or choice.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(self.tokenizer, choice.prompt_logprobs)}

    def whole(self, choice: ChoiceState) -> dict[str, Any]:
        echo = self.echo(choice)
        return {"index": choice.index, "text": echo + "".join(choice.text),
                "logprobs": self.logprobs(choice, choice.logprobs, len(echo), with_prompt=True),
                "finish_reason": choice.finish_reason, **self.extras(choice)}


async def _stream(
    state: ServerState, header: dict[str, Any], run: ChoiceRun, choices: list[ChoiceState], view: CompletionView,
    prompt_tokens: int, prompts: int, include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**header, 'choices': choice_list, **extra}, ensure_ascii=False)}\n\n"

    # The echo goes first; when it carries log-probabilities, it waits for the prefill that computes them.
    echo_waits = view.request.logprobs is not None or view.request.prompt_logprobs is not None
    echoed = [not view.echo(c) for c in choices]
    offsets = [len(view.echo(c)) for c in choices]
    events: list[str] = []
    try:
        for c in choices:
            if not echoed[c.index] and not echo_waits:
                echoed[c.index] = True
                events.append(chunk([{"index": c.index, "text": view.echo(c), "logprobs": None,
                                      "finish_reason": None}]))
        if events:
            yield one_write(events)
        async for index, output in run.outputs():
            choice = choices[index]
            choice.add(output)
            if not echoed[index]:
                echoed[index] = True
                events.append(chunk([{"index": index, "text": view.echo(choice), "finish_reason": None,
                                      "logprobs": view.logprobs(choice, [], 0, with_prompt=True),
                                      **view.extras(choice)}]))
            logprobs = view.logprobs(choice, output.new_logprobs, offsets[index], with_prompt=False)
            offsets[index] += len(output.new_text)
            if output.new_text or output.finished or logprobs:
                events.append(chunk([{"index": index, "text": output.new_text, "logprobs": logprobs,
                                      "finish_reason": output.finish_reason if output.finished else None}]))
            if events and not all_finished(choices):  # the last output's events go with the usage and [DONE]
                yield one_write(events)
        if include_usage:
            events.append(chunk([], usage=usage(prompt_tokens, choices, prompts)))
        state.finish_request(header["id"], prompt_tokens, choices, run)
    except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band, then end it properly
        events.append(stream_error(exc))
    finally:
        run.close()
    events.append("data: [DONE]\n\n")
    yield one_write(events)
