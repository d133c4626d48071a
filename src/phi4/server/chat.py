"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from phi4.engine.client import EngineRequest
from phi4.server import tools
from phi4.server.errors import APIError, stream_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, chat_logprobs, choice_seed, output_grammar, sampling_params, usage,
)
from phi4.server.protocol import ChatCompletionRequest
from phi4.server.state import Reservation, ServerState
from phi4.structured.grammars import GrammarSpec


def tool_call_grammar(request: ChatCompletionRequest) -> tuple[GrammarSpec | None, tuple[GrammarSpec, ...]]:
    """The grammar for tool_choice (None without tools or with "none"), and each function's parameter
    schema, which must compile on its own too (an error then names that function)."""
    if not request.tools:
        if request.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, ()
    checks = tuple(GrammarSpec("json_schema", tool.function.parameters or {"type": "object"},
                               f"tools.{index}.function.parameters") for index, tool in enumerate(request.tools))
    grammar = tools.tool_grammar(request.tools, request.tool_choice, request.parallel_tool_calls)
    if grammar is None:
        return None, checks
    if output_grammar(request) is not None:
        raise APIError(400, "response_format or structured_outputs cannot be combined with tool calls",
                       param="response_format")
    return GrammarSpec("lark", grammar, "tools"), checks


def engine_request(state: ServerState, request: ChatCompletionRequest) -> tuple[EngineRequest, bool]:
    """The request as the engine takes it, and whether its answers are tool calls."""
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens or request.max_tokens
    tool_grammar, checks = tool_call_grammar(request)
    grammar = tool_grammar or output_grammar(request)
    params = sampling_params(request, max_tokens, logprobs, state.max_stop_sequences)
    messages = tools.render_messages(request.messages, request.tools)
    return EngineRequest(messages, params, grammar, checks), tool_grammar is not None


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest, reservation: Reservation
) -> dict[str, Any] | AsyncIterator[str]:
    converted, with_tools = engine_request(state, request)
    prepared = await state.engine.prepare(converted)
    prompt = prepared.prompt_token_ids
    request_id = state.engine.new_request_id("chatcmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id,
                    [prepared.with_seed(choice_seed(request.seed, i)) for i in range(request.n)])
    reservation.release()  # the engine counts them now
    with_logprobs = converted.params.logprobs is not None
    choices = [ChoiceState(i, prompt) for i in range(request.n)]
    header = {"id": request_id, "created": int(time.time()), "model": state.served_model_name,
              "system_fingerprint": state.system_fingerprint}
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = _stream(state, header, run, choices, len(prompt), include_usage, with_logprobs, with_tools)
        weakref.finalize(stream, run.close)  # a client gone before the stream begins: nothing else closes it
        return stream
    async for index, output in run.outputs():
        choices[index].add(output)
    state.finish_request(request_id, len(prompt), choices, run)
    return {
        **header,
        "object": "chat.completion",
        "choices": [_message_choice(state, c, with_logprobs, with_tools) for c in choices],
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
    state: ServerState, header: dict[str, Any], run: ChoiceRun, choices: list[ChoiceState],
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
        async for index, output in run.outputs():
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
    except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band, then end it properly
        yield stream_error(exc)
    finally:
        run.close()
    yield "data: [DONE]\n\n"
