"""POST /v1/completions: the legacy text API, prompts as strings or token ids, with echo."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from phi4.server.errors import APIError, as_api_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, check_context, choice_seed, completion_logprobs, constrained, output_grammar,
    sampling_params, usage,
)
from phi4.server.protocol import CompletionRequest
from phi4.server.state import ServerState


def prompt_token_lists(state: ServerState, request: CompletionRequest) -> list[list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


async def create_completion(state: ServerState, request: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
    if request.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = prompt_token_lists(state, request)
    for prompt in prompts:
        check_context(len(prompt), request.max_tokens, state.max_model_len)
    n = request.n
    grammar = output_grammar(request, state.engine.engine.grammar_tokenizer) if constrained(request) else None
    params = [sampling_params(request, request.max_tokens, request.logprobs, choice_seed(request.seed, j), grammar)
              for _ in prompts for j in range(n)]
    choices = [ChoiceState(i * n + j, prompt) for i, prompt in enumerate(prompts) for j in range(n)]
    request_id = state.engine.new_request_id("cmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id)
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()),
              "model": state.served_model_name, "system_fingerprint": state.system_fingerprint}
    echoes = [state.tokenizer.decode(p) if request.echo else "" for p in prompts]
    outputs = run.run([c.prompt_token_ids for c in choices], params)
    prompt_tokens = sum(len(p) for p in prompts)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _stream(state, header, run, outputs, choices, echoes, n, prompt_tokens, include_usage,
                       request.logprobs is not None)
    async for index, output in outputs:
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
    state: ServerState, header: dict[str, Any], run: ChoiceRun, outputs: AsyncIterator, choices: list[ChoiceState],
    echoes: list[str], n: int, prompt_tokens: int, include_usage: bool, with_logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**header, 'choices': choice_list, **extra}, ensure_ascii=False)}\n\n"

    offsets = [len(echoes[c.index // n]) for c in choices]
    try:
        for c in choices:
            if echoes[c.index // n]:
                yield chunk([{"index": c.index, "text": echoes[c.index // n], "logprobs": None, "finish_reason": None}])
        async for index, output in outputs:
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
    except Exception as exc:  # the stream has begun: report in-band, then end it properly
        yield f"data: {json.dumps(as_api_error(exc).body())}\n\n"
    yield "data: [DONE]\n\n"
