"""The ASGI app in-process: start-up state, failures inside the engine, and message shapes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from phi4.engine.client import InProcessEngine
from phi4.engine.engine import LLMEngine
from phi4.model.loader import resolve_checkpoint
from phi4.server.app import LoadingState, create_app
from phi4.server.state import ServerState

MODEL = "microsoft/phi-4"


@pytest.fixture()
def state(demo_dir) -> Iterator[ServerState]:  # type: ignore[no-untyped-def]
    engine = InProcessEngine(LLMEngine(resolve_checkpoint("demo")))
    yield ServerState(engine, MODEL)
    engine.shutdown()


def test_health_is_503_until_the_model_is_loaded(state: ServerState) -> None:
    release = threading.Event()

    def slow_load() -> ServerState:
        release.wait(30)
        return state

    loading = LoadingState(slow_load)
    loading.start()
    with TestClient(create_app(loading)) as client:
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
        assert client.post("/v1/chat/completions", json={}).status_code == 503
        release.set()
        loading.wait(30)
        assert client.get("/health").status_code == 200


def test_an_engine_failure_mid_stream_is_an_error_event_and_the_server_lives_on(
    state: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = state.engine.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def failing_execute(scheduled, constraints):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return original(scheduled, constraints)

    monkeypatch.setattr(runner, "execute", failing_execute)
    loading = LoadingState(lambda: state)
    loading.start()
    loading.wait(30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    with TestClient(create_app(loading)) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert error["error"]["type"] == "server_error" and "injected failure" in error["error"]["message"]
        assert any("content" in json.loads(e)["choices"][0]["delta"] for e in events[1:-2])
        after = client.post("/v1/chat/completions", json={**body, "stream": False})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 20
        assert state.engine.engine.block_manager.usage == 0


def test_text_parts_and_developer_messages(state: ServerState) -> None:
    loading = LoadingState(lambda: state)
    loading.start()
    loading.wait(30)
    with TestClient(create_app(loading)) as client:
        def tokens(messages: list[dict]) -> list[int]:
            return client.post("/tokenize", json={"messages": messages}).json()["tokens"]

        plain = tokens([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
        parts = tokens([{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text",
                                                                                       "text": "brief."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
        assert parts == plain
        image = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert image.status_code == 400 and image.json()["error"]["param"].startswith("messages.0.content")


def test_completion_logprobs_have_the_legacy_shape(state: ServerState) -> None:
    loading = LoadingState(lambda: state)
    loading.start()
    loading.wait(30)
    with TestClient(create_app(loading)) as client:
        body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 5, "temperature": 0, "logprobs": 2}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
        assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == 0
        assert "".join(logprobs["tokens"]) == choice["text"]
        # with echo the prompt's tokens come first, the very first without a log-probability (as vLLM)
        echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
        prompt_tokens = len(client.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"])
        assert echoed["text"] == "Hello there" + choice["text"]
        assert len(echoed["logprobs"]["tokens"]) == prompt_tokens + 5
        assert echoed["logprobs"]["token_logprobs"][0] is None and echoed["logprobs"]["top_logprobs"][0] is None
        assert echoed["logprobs"]["token_logprobs"][prompt_tokens:] == logprobs["token_logprobs"]
        assert echoed["logprobs"]["text_offset"][0] == 0
