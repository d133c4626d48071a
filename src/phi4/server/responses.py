"""POST /v1/responses: OpenAI's Responses API on the same engine path as chat completions.

A request becomes a chat request (instructions as a system message, the stored conversation of
`previous_response_id`, input messages, function calls and their outputs, function tools, `text.format` as
`response_format`), runs as one choice, and its answer is read by the same AnswerReader into output items:
reasoning (reasoning models), a message with output text, and function calls. Streaming sends the
Responses event sequence: response.created, response.in_progress, per item output_item.added,
content_part.added, output_text.delta / reasoning_text.delta / function_call_arguments.delta, the matching
.done events, output_item.done, and response.completed (or response.incomplete when max_output_tokens cut
it). Stored responses (`store`, the default) are kept in memory, the newest MAX_STORED.
"""

from __future__ import annotations

import json
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from phi4.engine.client import RequestOutput
from phi4.server.answer import AnswerEvent, AnswerReader
from phi4.server.chat import engine_request
from phi4.server.errors import APIError, as_api_error, logger
from phi4.server.generation import ChoiceRun, ChoiceState, usage
from phi4.server.protocol import (
    ChatCompletionRequest, ChatMessage, ResponseContentPart, ResponsesRequest, ResponseToolChoiceFunction,
)
from phi4.server.state import Reservation, ServerState

MAX_STORED = 1024


@dataclass
class StoredResponse:
    body: dict[str, Any]
    conversation: list[ChatMessage]  # what a follow-up continues: earlier turns, this input, this answer


class ResponseStore:
    """Stored responses, the newest `capacity`, for `previous_response_id` and GET /v1/responses/{id}."""

    def __init__(self, capacity: int = MAX_STORED) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse:
        stored = self._items.get(response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{response_id}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._items[response_id] = stored
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def _text(content: str | list[ResponseContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def conversation(request: ResponsesRequest, store: ResponseStore) -> list[ChatMessage]:
    """The turns the model sees, without the instructions (they are not carried to a follow-up)."""
    messages: list[ChatMessage] = list(store.get(request.previous_response_id).conversation) \
        if request.previous_response_id else []
    if isinstance(request.input, str):
        return [*messages, ChatMessage(role="user", content=request.input)]
    for item in request.input:
        if item.type == "message":
            messages.append(ChatMessage(role=item.role or "user", content=_text(item.content)))
        elif item.type == "function_call":
            call = {"id": item.call_id or f"call_{secrets.token_hex(12)}", "type": "function",
                    "function": {"name": item.name or "", "arguments": item.arguments or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                messages[-1] = ChatMessage.model_validate({**last.model_dump(), "tool_calls": [
                    *[c.model_dump() for c in last.tool_calls], call]})
            else:
                messages.append(ChatMessage.model_validate({"role": "assistant", "tool_calls": [call]}))
        elif item.type == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output)))
        # reasoning items are not fed back: the model thinks afresh each turn
    return messages


def chat_request(request: ResponsesRequest, turns: list[ChatMessage]) -> ChatCompletionRequest:
    for index, tool in enumerate(request.tools or []):
        if tool.type != "function" or not tool.name:
            raise APIError(400, f"tools.{index}: only function tools are served here, not {tool.type!r}",
                           param=f"tools.{index}.type")
    instructions = [{"role": "system", "content": request.instructions}] if request.instructions else []
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [*instructions, *(m.model_dump(exclude_none=True) for m in turns)],
        "max_completion_tokens": request.max_output_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "seed": request.seed, "parallel_tool_calls": request.parallel_tool_calls,
        "tools": [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                    "parameters": t.parameters, "strict": t.strict}}
                  for t in request.tools or []] or None,
    }
    choice = request.tool_choice
    body["tool_choice"] = choice if not isinstance(choice, ResponseToolChoiceFunction) else {
        "type": "function", "function": {"name": choice.name}}
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif text_format is not None and text_format.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": text_format.name or "response", "schema": text_format.schema_, "strict": text_format.strict}}
    if not turns:
        raise APIError(400, "input must hold at least one message", param="input")
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class ResponseBuilder:
    """The response object and its output items, grown from the reader's events."""

    request: ResponsesRequest
    model: str
    response_id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    open_item: dict[str, Any] | None = None
    _open_text: list[str] = field(default_factory=list)  # the open item's text or arguments, set when it closes

    def body(self, status: str, usage_: dict[str, Any] | None = None, incomplete: bool = False) -> dict[str, Any]:
        request = self.request
        tool_choice = request.tool_choice
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": self.output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.instructions, "metadata": request.metadata or {},
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "temperature": request.temperature, "top_p": request.top_p,
            "max_output_tokens": request.max_output_tokens, "previous_response_id": request.previous_response_id,
            "tool_choice": (tool_choice.model_dump() if tool_choice is not None and not isinstance(tool_choice, str)
                            else tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
            "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)
                     if request.text is not None and request.text.format is not None else {"type": "text"}},
            "store": request.store, "user": request.user, "usage": usage_,
        }

    def events(self, event: AnswerEvent) -> list[dict[str, Any]]:
        """The Responses events for one reader event (opening and closing items as needed)."""
        kind = {"reasoning": "reasoning", "content": "message"}.get(event.kind, "function_call")
        events: list[dict[str, Any]] = []
        item = self.open_item
        if item is None or item["type"] != kind or event.kind == "call":
            events += self.close()
            events += self._open(kind, event)
            item = self.open_item
        assert item is not None
        index = len(self.output) - 1
        if kind == "reasoning":
            self._open_text.append(event.text)
            events.append({"type": "response.reasoning_text.delta", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "delta": event.text})
        elif kind == "message":
            self._open_text.append(event.text)
            events.append({"type": "response.output_text.delta", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "delta": event.text, "logprobs": []})
        elif event.kind == "arguments":
            self._open_text.append(event.text)
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": index, "delta": event.text})
        return events

    def _open(self, kind: str, event: AnswerEvent) -> list[dict[str, Any]]:
        if kind == "function_call":
            assert event.call is not None
            item = {"type": "function_call", "id": _id("fc"), "call_id": event.call.id, "name": event.call.name,
                    "arguments": "", "status": "in_progress"}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
        else:
            item = {"type": "message", "id": _id("msg"), "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.output.append(item)
        self.open_item = item
        index = len(self.output) - 1
        added = {"type": "response.output_item.added", "output_index": index,
                 "item": {**item, "content": []} if "content" in item else dict(item)}
        if kind == "function_call":
            return [added]
        part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else \
            {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [added, {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": part}]

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        text, self._open_text = "".join(self._open_text), []
        item["status"] = status
        index = len(self.output) - 1
        events: list[dict[str, Any]] = []
        if item["type"] == "function_call":
            item["arguments"] = text
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            part["text"] = text
            text_type = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            done = {"type": text_type, "item_id": item["id"], "output_index": index, "content_index": 0,
                    "text": part["text"]}
            if item["type"] == "message":
                done["logprobs"] = []
            events += [done, {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                              "content_index": 0, "part": dict(part)}]
        return [*events, {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]


def _usage(state: ServerState, prompt_tokens: int, choice: ChoiceState, reader: AnswerReader) -> dict[str, Any]:
    counts = usage(prompt_tokens, [choice])
    reasoning = len(state.tokenizer.encode(reader.reasoning)) if reader.reasoning else 0
    return {"input_tokens": counts["prompt_tokens"], "output_tokens": counts["completion_tokens"],
            "total_tokens": counts["total_tokens"],
            "input_tokens_details": {"cached_tokens": counts["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


async def create_response(state: ServerState, request: ResponsesRequest,
                          reservation: Reservation) -> dict[str, Any] | AsyncIterator[str]:
    turns = conversation(request, state.responses)
    chat = chat_request(request, turns)
    converted, tool_names = engine_request(state, chat)
    prepared = await state.engine.prepare(converted)
    builder = ResponseBuilder(request, state.served_model_name)
    run = ChoiceRun(state.engine, state.metrics, builder.response_id, [prepared])
    reservation.release()  # the engine counts it now
    reader = AnswerReader(state.tokenizer.reasoning_tags, tool_names, prepared.thinking)
    choice = ChoiceState(0, prepared.prompt_token_ids)
    answer = Answer(state, request, builder, reader, choice, turns, len(prepared.prompt_token_ids), run)
    if request.stream:
        stream = answer.stream()
        weakref.finalize(stream, run.close)  # a client gone before the stream begins: nothing else closes it
        return stream
    async for _, output in run.outputs():
        answer.add(output)
    return answer.finish()[1]


@dataclass
class Answer:
    """One response in the making: outputs in, events out, and at the end the body (stored if asked)."""

    state: ServerState
    request: ResponsesRequest
    builder: ResponseBuilder
    reader: AnswerReader
    choice: ChoiceState
    turns: list[ChatMessage]
    prompt_tokens: int
    run: ChoiceRun

    def add(self, output: RequestOutput) -> list[dict[str, Any]]:
        self.choice.add(output)
        events: list[dict[str, Any]] = []
        for event in self.reader.feed(output.new_text, final=output.finished):
            events += self.builder.events(event)
        return events

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        incomplete = self.choice.finish_reason == "length"
        events = self.builder.close("incomplete" if incomplete else "completed")
        if not self.builder.output:  # an empty answer is still a message
            events += self.builder.events(AnswerEvent("content", "")) + self.builder.close()
        body = self.builder.body("incomplete" if incomplete else "completed",
                                 _usage(self.state, self.prompt_tokens, self.choice, self.reader), incomplete)
        self.state.finish_request(self.builder.response_id, self.prompt_tokens, [self.choice], self.run)
        if self.request.store:
            answer: dict[str, Any] = {"role": "assistant", "content": self.reader.content or None}
            if self.reader.calls:
                answer["tool_calls"] = [call.as_openai() for call in self.reader.calls]
            self.state.responses.put(body["id"], StoredResponse(
                body, [*self.turns, ChatMessage.model_validate(answer)]))
        return events, body

    async def stream(self) -> AsyncIterator[str]:
        sequence = 0

        def sse(event: dict[str, Any]) -> str:
            nonlocal sequence
            event = {**event, "sequence_number": sequence}
            sequence += 1
            return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

        try:
            yield sse({"type": "response.created", "response": self.builder.body("in_progress")})
            yield sse({"type": "response.in_progress", "response": self.builder.body("in_progress")})
            async for _, output in self.run.outputs():
                for event in self.add(output):
                    yield sse(event)
            events, body = self.finish()
            for event in events:
                yield sse(event)
            kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            yield sse({"type": kind, "response": body})
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report in-band
            error = as_api_error(exc)
            if error.status >= 500 and not isinstance(exc, APIError):
                logger.error("a response stream failed: %s", error.message, exc_info=exc)
            yield sse({"type": "error", "code": error.code, "message": error.message, "param": error.param})
        finally:
            self.run.close()
