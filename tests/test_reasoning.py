"""A reasoning model (a chat template with think tags, as phi-4-reasoning): the thinking comes apart from the
answer in chat completions (whole and streamed) and in the Responses API, and response formats and tools
hold for the answer, not the thinking. Served from a scripted checkpoint whose greedy answer is
`<think>Hmm ok</think>Hello!` (conftest.reasoning_dir)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from live_server import MODEL, Server

MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def thinker(reasoning_dir: Path) -> Iterator[openai.OpenAI]:
    server = Server(api_key=None, model=str(reasoning_dir))
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    finally:
        server.stop()


def test_chat_returns_the_thinking_apart(thinker: openai.OpenAI) -> None:
    response = thinker.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    message = response.choices[0].message
    assert message.content == "Hello!" and response.choices[0].finish_reason == "stop"
    assert message.reasoning_content == message.reasoning == "Hmm ok"  # vLLM's name and OpenRouter's


def test_streamed_chat_sends_reasoning_deltas_then_content(thinker: openai.OpenAI) -> None:
    chunks = list(thinker.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                  stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("Hmm ok", "Hello!")
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])


def test_a_response_format_holds_for_the_answer_after_free_thinking(thinker: openai.OpenAI) -> None:
    response = thinker.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, temperature=0,
                                               response_format={"type": "json_object"})
    message = response.choices[0].message
    assert message.reasoning_content == "Hmm ok"
    assert isinstance(json.loads(message.content), dict) and response.choices[0].finish_reason == "stop"


def test_the_responses_api_returns_a_reasoning_item(thinker: openai.OpenAI) -> None:
    response = thinker.responses.create(model=MODEL, input="Hi there", max_output_tokens=20, temperature=0)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"] and response.status == "completed"
    assert response.output[0].content[0].text == "Hmm ok" and response.output_text == "Hello!"
    assert response.usage.output_tokens_details.reasoning_tokens == 2
    with thinker.responses.stream(model=MODEL, input="Hi there", max_output_tokens=20, temperature=0) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Hmm ok"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello!"
