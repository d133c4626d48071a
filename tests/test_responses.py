"""The Responses API (POST /v1/responses) through the official openai SDK: text, streamed events, function
calls and their outputs across `previous_response_id`, `text.format`, stored responses."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from live_server import MODEL, Server

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class Person(BaseModel):
    name: str
    age: int


def test_a_response_has_openais_shape_and_true_usage(client: openai.OpenAI, server: Server) -> None:
    response = client.responses.create(model=MODEL, input="Say hi", instructions="Be brief.", max_output_tokens=6,
                                       temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    prompt = server.post("/tokenize", {"messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hi"}]}).json()["count"]
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, 6)
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_streamed_events_build_the_same_response(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=8, temperature=0)
    with client.responses.stream(model=MODEL, input="Say hi", max_output_tokens=8, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == whole.output_text


def test_a_function_call_and_its_output_continue_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=60, temperature=0)
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    follow_up = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=4, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "12 C and sunny"}])
    assert follow_up.previous_response_id == first.id
    assert follow_up.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the whole history
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]


def test_text_format_holds_and_parse_gives_the_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model=MODEL, input="A person", text_format=Person, max_output_tokens=60,
                                     extra_body={"seed": 3})
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Person)
    plain = client.responses.create(model=MODEL, input="Anything", text={"format": {"type": "json_object"}},
                                    max_output_tokens=40, extra_body={"seed": 4})
    assert isinstance(json.loads(plain.output_text), dict)


def test_bad_requests_are_clear_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}], max_output_tokens=2)
