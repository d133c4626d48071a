"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from phi4.server.errors import APIError, as_api_error
from phi4.errors import InvalidRequestError
from phi4.server import tools
from phi4.server.generation import (
    ChoiceRun, ChoiceState, chat_logprobs, check_context, choice_seed, constrained, output_grammar, sampling_params,
    usage,
)
from phi4.structured import grammars
from phi4.server.protocol import ChatCompletionRequest
from phi4.server.state import ServerState


def prompt_token_ids(state: ServerState, request: ChatCompletionRequest) -> list[int]:
    messages = tools.render_messages(request.messages, request.tools)
    text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return state.tokenizer.encode(text)


def tool_call_grammar(state: ServerState, request: ChatCompletionRequest) -> str | None:
    """The grammar for tool_choice, after checking every function's parameter schema; None without tools."""
    if not request.tools:
        if request.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    tokenizer = state.engine.engine.grammar_tokenizer
    for index, tool in enumerate(request.tools):
        param = f"tools.{index}.function.parameters"
        try:
            grammars.check(grammars.json_schema_grammar(tool.function.parameters or {"type": "object"}), tokenizer,
                           param)
        except InvalidRequestError:
            raise
        except Exception as exc:  # llguidance's own complaint about the schema
            raise InvalidRequestError(f"the {param} cannot be compiled: {exc}", param) from exc
    grammar = tools.tool_grammar(request.tools, request.tool_choice, request.parallel_tool_calls)
    if grammar is not None:
        if constrained(request):
            raise APIError(400, "response_format or structured_outputs cannot be combined with tool calls",
                           param="response_format")
        grammars.check(grammar, tokenizer, "tools")
    return grammar


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest
) -> dict[str, Any] | AsyncIterator[str]:
    prompt = prompt_token_ids(state, request)
    max_tokens = request.max_completion_tokens or request.max_tokens
    check_context(len(prompt), max_tokens, state.max_model_len)
    top = request.top_logprobs or 0
    logprobs = top if request.logprobs else None
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    tool_grammar = tool_call_grammar(state, request)
    grammar = tool_grammar or (output_grammar(request, state.engine.engine.grammar_tokenizer)
                               if constrained(request) else None)
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
        return _stream(state, header, run, outputs, choices, len(prompt), include_usage, logprobs is not None,
                       tool_grammar is not None)
    async for index, output in outputs:
        choices[index].add(output)
    state.finish_request(request_id, len(prompt), choices, run)
    return {
        **header,
        "object": "chat.completion",
        "choices": [_message_choice(state, c, logprobs is not None, tool_grammar is not None) for c in choices],
        "usage": usage(len(prompt), choices),
    }


def _message_choice(state: ServerState, choice: ChoiceState, with_logprobs: bool, with_tools: bool) -> dict[str, Any]:
    text = "".join(choice.text)
    calls = tools.parse_tool_calls(text) if with_tools and choice.finish_reason == "stop" else []
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else text, "refusal": None}
    if calls:
        message["tool_calls"] = [call.as_openai() for call in calls]
    return {"index": choice.index, "message": message,
            "logprobs": chat_logprobs(state.tokenizer, choice.logprobs) if with_logprobs else None,
            "finish_reason": "tool_calls" if calls else choice.finish_reason}


async def _stream(
    state: ServerState, header: dict[str, Any], run: ChoiceRun, outputs: AsyncIterator, choices: list[ChoiceState],
    prompt_tokens: int, include_usage: bool, with_logprobs: bool, with_tools: bool,
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
        # With tools, an answer is held back until it shows whether it is text or tool calls.
        modes: list[str | None] = [None if with_tools else "text" for _ in choices]
        held = [""] * len(choices)
        streamers = [tools.ToolCallStreamer() for _ in choices]
        async for index, output in outputs:
            choices[index].add(output)
            piece = output.new_text
            if modes[index] is None:
                held[index] += piece
                decided = tools.ToolCallStreamer(text=held[index]).is_tool_call()
                if decided is None and not output.finished:
                    continue
                modes[index] = "tools" if decided else "text"
                piece, held[index] = held[index], ""
            if modes[index] == "tools":
                for delta in streamers[index].feed(piece, final=output.finished):
                    yield chunk([{"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None,
                                  "finish_reason": None}])
            else:
                logprobs = chat_logprobs(state.tokenizer, output.new_logprobs) if with_logprobs else None
                if piece or (logprobs and logprobs["content"]):
                    yield chunk([{"index": index, "delta": {"content": piece}, "logprobs": logprobs,
                                  "finish_reason": None}])
            if output.finished:
                called = modes[index] == "tools" and bool(streamers[index].calls) and output.finish_reason == "stop"
                yield chunk([{"index": index, "delta": {}, "logprobs": None,
                              "finish_reason": "tool_calls" if called else output.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, choices))
        state.finish_request(header["id"], prompt_tokens, choices, run)
    except Exception as exc:  # the stream has begun: report in-band, then end it properly
        error = as_api_error(exc)
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"
