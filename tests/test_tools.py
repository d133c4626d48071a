"""Tool calling through the server with the `openai` client, for every tool_choice, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from live_server import MODEL, Server
from phi4.tokenizer import Tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def call(client: openai.OpenAI, stream: bool, **kwargs: object) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason)."""
    args = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, "max_tokens": 96, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]  # type: ignore[arg-type]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **args) if c.choices]  # type: ignore[arg-type]
    content = "".join(c.choices[0].delta.content or "" for c in chunks) or None
    fragments: dict[int, list] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in fragments:
                # The first fragment of a call carries its index, id, type and name.
                assert delta.id and delta.type == "function" and delta.function.name
                fragments[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and not delta.function.name
            fragments[delta.index][1] += delta.function.arguments or ""
    return content, [tuple(fragments[i]) for i in sorted(fragments)], chunks[-1].choices[0].finish_reason


def assert_valid(calls: list[tuple[str, str]], names: set[str]) -> None:
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_gives_valid_calls_to_declared_functions(client: openai.OpenAI, stream: bool) -> None:
    for seed in (1, 2, 3):
        content, calls, finish = call(client, stream, tool_choice="required", seed=seed)
        assert calls and finish == "tool_calls" and content is None
        assert_valid(calls, {"get_weather", "add"})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_function_gives_exactly_one_call_to_it(client: openai.OpenAI, stream: bool) -> None:
    for seed in (1, 2):
        _, calls, finish = call(client, stream, seed=seed,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert len(calls) == 1 and calls[0][0] == "get_weather" and finish == "tool_calls"
        assert_valid(calls, {"get_weather"})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_gives_text_or_valid_calls_and_none_gives_text(client: openai.OpenAI, stream: bool) -> None:
    for seed in (1, 2, 3):
        content, calls, finish = call(client, stream, tool_choice="auto", seed=seed)
        if calls:
            assert finish == "tool_calls" and content is None
            assert_valid(calls, {"get_weather", "add"})
        else:
            assert content and not content.startswith("<") and finish in ("stop", "length")
        content, calls, finish = call(client, stream, tool_choice="none", seed=seed, max_tokens=16)
        assert not calls and finish != "tool_calls"


def test_parallel_tool_calls_false_allows_one_call(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        _, calls, _ = call(client, False, tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert len(calls) == 1


def test_streamed_calls_equal_whole_ones(client: openai.OpenAI) -> None:
    assert call(client, False, tool_choice="required", seed=7)[1] == call(client, True, tool_choice="required",
                                                                           seed=7)[1]


def test_tool_results_and_earlier_calls_are_rendered_into_the_conversation(server: Server, demo_dir: Path) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    tokens = server.post("/tokenize", {"messages": messages}).json()["tokens"]
    text = Tokenizer(demo_dir).decode(tokens)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '<tool_response>{"tool_call_id": "call_1", "content": "18 degrees, sunny"}</tool_response>' in text
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": TOOLS,
                                                    "max_tokens": 8})
    assert response.status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
])
def test_bad_tool_requests_are_400(server: Server, body: dict, param: str) -> None:
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
