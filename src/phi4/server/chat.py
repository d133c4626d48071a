"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from phi4.engine.client import EngineRequest
from phi4.server import tools
from phi4.server.answer import AnswerReader
from phi4.server.errors import APIError, stream_error
from phi4.server.generation import (
    ChoiceRun, ChoiceState, all_finished, chat_logprobs, choice_seed, one_write, output_grammar, sampling_params, usage,
    vllm_prompt_logprobs,
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


def engine_request(state: ServerState, request: ChatCompletionRequest) -> tuple[EngineRequest, frozenset[str] | None]:
    """The request as the engine takes it, and the functions its answers may call (None: no tool calls)."""
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens == 0 and request.prompt_logprobs is None:
        raise APIError(400, "max_tokens 0 is only for prompt_logprobs", param="max_tokens")
    tool_grammar, checks = tool_call_grammar(request)
    grammar = tool_grammar or output_grammar(request)
    params = sampling_params(request, max_tokens, logprobs, state.max_stop_sequences, request.prompt_logprobs)
    messages = tools.render_messages(request.messages, request.tools)
    reasoning = state.tokenizer.reasoning_tags is not None
    names = frozenset(t.function.name for t in request.tools or ()) if tool_grammar is not None else None
    return EngineRequest(messages, params, grammar, checks, reasoning), names


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest, reservation: Reservation
) -> dict[str, Any] | AsyncIterator[str]:
    converted, tool_names = engine_request(state, request)
    prepared = await state.engine.prepare(converted)
    prompt = prepared.prompt_token_ids
    request_id = state.engine.new_request_id("chatcmpl")
    run = ChoiceRun(state.engine, state.metrics, request_id,
                    [prepared.with_seed(choice_seed(request.seed, i)) for i in range(request.n)])
    reservation.release()  # the engine counts them now
    with_logprobs = converted.params.logprobs is not None
    choices = [ChoiceState(i, prompt) for i in range(request.n)]
    readers = [AnswerReader(state.tokenizer.reasoning_tags, tool_names, prepared.thinking) for _ in choices]
    header = {"id": request_id, "created": int(time.time()), "model": state.served_model_name,
              "system_fingerprint": state.system_fingerprint}
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = _stream(state, header, run, choices, readers, len(prompt), include_usage, with_logprobs)
        weakref.finalize(stream, run.close)  # a client gone before the stream begins: nothing else closes it
        return stream
    async for index, output in run.outputs():
        choices[index].add(output)
    state.finish_request(request_id, len(prompt), choices, run)
    extras = {}
    if request.prompt_logprobs is not None and choices[0].prompt_logprobs is not None:  # vLLM's extension
        extras["prompt_logprobs"] = vllm_prompt_logprobs(state.tokenizer, choices[0].prompt_logprobs)
    return {
        **header,
        "object": "chat.completion",
        "choices": [_message_choice(state, c, reader, with_logprobs) for c, reader in zip(choices, readers)],
        "usage": usage(len(prompt), choices),
        **extras,
    }


def _message_choice(state: ServerState, choice: ChoiceState, reader: AnswerReader,
                    with_logprobs: bool) -> dict[str, Any]:
    reader.feed("".join(choice.text), final=True)
    # calls count when the answer ended by itself, not cut at max_tokens
    calls = reader.calls if choice.finish_reason == "stop" else []
    content = reader.content if calls or not reader.calls else reader.answer_text  # cut short: it stays text
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
    if reader.reasoning_tags is not None:
        message["reasoning_content"] = message["reasoning"] = reader.reasoning or None
    if calls:
        message["tool_calls"] = [call.as_openai() for call in calls]
    return {"index": choice.index, "message": message,
            "logprobs": chat_logprobs(state.tokenizer, choice.logprobs) if with_logprobs else None,
            "finish_reason": "tool_calls" if calls else choice.finish_reason}


async def _stream(
    state: ServerState, header: dict[str, Any], run: ChoiceRun, choices: list[ChoiceState],
    readers: list[AnswerReader], prompt_tokens: int, include_usage: bool, with_logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        body = {**header, "object": "chat.completion.chunk", "choices": choice_list, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(index: int, fields: dict[str, Any], logprobs: dict[str, Any] | None = None) -> str:
        return chunk([{"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": None}])

    events: list[str] = []
    try:
        yield "".join(delta(c.index, {"role": "assistant", "content": ""}) for c in choices)
        async for index, output in run.outputs():
            choices[index].add(output)
            logprobs = chat_logprobs(state.tokenizer, output.new_logprobs) if with_logprobs else None
            for event in readers[index].feed(output.new_text, final=output.finished):
                if event.kind == "reasoning":
                    events.append(delta(index, {"reasoning_content": event.text, "reasoning": event.text}))
                elif event.kind == "content":
                    events.append(delta(index, {"content": event.text}, logprobs))
                    logprobs = None
                elif event.kind == "call":
                    call = event.call
                    assert call is not None
                    events.append(delta(index, {"tool_calls": [{
                        "index": event.index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]}))
                else:
                    events.append(delta(index, {"tool_calls": [{"index": event.index,
                                                                "function": {"arguments": event.text}}]}))
            if logprobs and logprobs["content"]:  # tokens whose text is held back still report their logprobs
                events.append(delta(index, {"content": ""}, logprobs))
            if output.finished:
                called = bool(readers[index].calls) and output.finish_reason == "stop"
                events.append(chunk([{"index": index, "delta": {}, "logprobs": None,
                                      "finish_reason": "tool_calls" if called else output.finish_reason}]))
            if events and not all_finished(choices):  # the last output's events go with the usage and [DONE]
                yield one_write(events)
        if include_usage:
            events.append(chunk([], usage=usage(prompt_tokens, choices)))
        state.finish_request(header["id"], prompt_tokens, choices, run)
    except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band, then end it properly
        events.append(stream_error(exc))
    finally:
        run.close()
    events.append("data: [DONE]\n\n")
    yield one_write(events)
