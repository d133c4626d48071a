"""POST /v1/completions: the legacy text API, prompts as strings or token ids, with echo."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from phi4.engine.client import EngineRequest
from phi4.server.errors import APIError, stream_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, choice_seed, completion_logprobs, output_grammar, sampling_params, usage,
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
    n = request.n
    params = sampling_params(request, request.max_tokens, request.logprobs, state.max_stop_sequences)
    grammar = output_grammar(request)
    prepared = [await state.engine.prepare(EngineRequest(prompt, params, grammar)) for prompt in prompts_of(request)]
    request_id = state.engine.new_request_id("cmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id,
                    [p.with_seed(choice_seed(request.seed, j)) for p in prepared for j in range(n)])
    reservation.release()  # the engine counts them now
    choices = [ChoiceState(i * n + j, p.prompt_token_ids) for i, p in enumerate(prepared) for j in range(n)]
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()),
              "model": state.served_model_name, "system_fingerprint": state.system_fingerprint}
    echoes = [state.tokenizer.decode(p.prompt_token_ids) if request.echo else "" for p in prepared]
    prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = _stream(state, header, run, choices, echoes, n, prompt_tokens, include_usage,
                         request.logprobs is not None)
        weakref.finalize(stream, run.close)  # a client gone before the stream begins: nothing else closes it
        return stream
    async for index, output in run.outputs():
        choices[index].add(output)
    state.finish_request(request_id, prompt_tokens, choices, run)
    return {
        **header,
        "choices": [
            {"index": c.index, "text": echoes[c.index // n] + "".join(c.text),
             "logprobs": completion_logprobs(state.tokenizer, c.logprobs, len(echoes[c.index // n]))
             if request.logprobs is not None else None,
             "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": usage(prompt_tokens, choices),
    }


async def _stream(
    state: ServerState, header: dict[str, Any], run: ChoiceRun, choices: list[ChoiceState],
    echoes: list[str], n: int, prompt_tokens: int, include_usage: bool, with_logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**header, 'choices': choice_list, **extra}, ensure_ascii=False)}\n\n"

    offsets = [len(echoes[c.index // n]) for c in choices]
    try:
        for c in choices:
            if echoes[c.index // n]:
                yield chunk([{"index": c.index, "text": echoes[c.index // n], "logprobs": None, "finish_reason": None}])
        async for index, output in run.outputs():
            choices[index].add(output)
            logprobs = None
            if with_logprobs:
                logprobs = completion_logprobs(state.tokenizer, output.new_logprobs, offsets[index])
            offsets[index] += len(output.new_text)
            if output.new_text or output.finished or logprobs:
                yield chunk([{"index": index, "text": output.new_text, "logprobs": logprobs,
                              "finish_reason": output.finish_reason if output.finished else None}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, choices))
        state.finish_request(header["id"], prompt_tokens, choices, run)
    except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band, then end it properly
        yield stream_error(exc)
    finally:
        run.close()
    yield "data: [DONE]\n\n"
