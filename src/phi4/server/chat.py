"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from phi4.server.errors import APIError, as_api_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, chat_logprobs, check_context, choice_seed, constrained, output_grammar, sampling_params,
    usage,
)
from phi4.server.protocol import ChatCompletionRequest
from phi4.server.state import ServerState


def render_messages(state: ServerState, request: ChatCompletionRequest) -> list[int]:
    messages = []
    for message in request.messages:
        if message.role == "tool" or message.tool_calls:
            raise APIError(400, "tool messages and assistant tool_calls need tools support, which this server "
                                "does not have yet", param="messages")
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text()})
    text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return state.tokenizer.encode(text)


def validate_unsupported(request: ChatCompletionRequest) -> None:
    # Accepted and validated by the protocol; enforcing tool calls is work still to come.
    if request.tools and request.tool_choice not in (None, "none"):
        raise APIError(400, "tool calling is not supported yet; pass tool_choice 'none'", param="tool_choice")


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest
) -> dict[str, Any] | AsyncIterator[str]:
    validate_unsupported(request)
    prompt = render_messages(state, request)
    max_tokens = request.max_completion_tokens or request.max_tokens
    check_context(len(prompt), max_tokens, state.max_model_len)
    top = request.top_logprobs or 0
    logprobs = top if request.logprobs else None
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    grammar = output_grammar(request, state.engine.engine.grammar_tokenizer) if constrained(request) else None
    params = [sampling_params(request, max_tokens, logprobs, choice_seed(request.seed, i), grammar)
              for i in range(request.n)]
    request_id = state.engine.new_request_id("chatcmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id)
    choices = [ChoiceState(i, prompt) for i in range(request.n)]
    header = {"id": request_id, "created": int(time.time()), "model": state.served_model_name,
              "system_fingerprint": state.system_fingerprint}
    outputs = run.run([prompt] * request.n, params)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _stream(state, header, run, outputs, choices, len(prompt), include_usage, logprobs is not None)
    async for index, output in outputs:
        choices[index].add(output)
    state.finish_request(request_id, len(prompt), choices, run)
    return {
        **header,
        "object": "chat.completion",
        "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
             "logprobs": chat_logprobs(state.tokenizer, c.logprobs) if logprobs is not None else None,
             "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": usage(len(prompt), choices),
    }


async def _stream(
    state: ServerState, header: dict[str, Any], run: ChoiceRun, outputs: AsyncIterator, choices: list[ChoiceState],
    prompt_tokens: int, include_usage: bool, with_logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        body = {**header, "object": "chat.completion.chunk", "choices": choice_list, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for c in choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for index, output in outputs:
            choice = choices[index]
            choice.add(output)
            if output.new_text or (with_logprobs and output.new_logprobs):
                logprobs = chat_logprobs(state.tokenizer, output.new_logprobs) if with_logprobs else None
                yield chunk([{"index": index, "delta": {"content": output.new_text}, "logprobs": logprobs,
                              "finish_reason": None}])
            if output.finished:
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": output.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, choices))
        state.finish_request(header["id"], prompt_tokens, choices, run)
    except Exception as exc:  # the stream has begun: report in-band, then end it properly
        error = as_api_error(exc)
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"
