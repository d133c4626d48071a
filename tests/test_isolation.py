"""One request never hurts another: each trigger that once ended every request in flight now gets its own
clear answer while bystanders finish with all their tokens; requests are aborted when their client leaves;
the queue counts sequences; nothing slow runs on the event loop; slow clients and shutdown are bounded."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from live_server import MODEL, Server
from phi4 import LLM, SamplingParams
from phi4.engine.output import OutputProcessor
from phi4.structured.constraint import Constraint, GrammarError

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
BYSTANDER_TOKENS = 32


def stream_events(server: Server, body: dict, timeout: float = 120) -> list[str]:
    """Every `data:` payload of a streamed request, [DONE] included."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def bystander_tokens(events: list[str]) -> int:
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and not any("error" in c for c in chunks), events[-3:]
    return chunks[-1]["usage"]["completion_tokens"]


TRIGGERS = {
    # once an exception inside the engine's step, ending every request in flight
    "top_k 2^63": ({"top_k": 9223372036854775808}, 400),
    # once "grammar refused token 100351" for the whole batch; now greedy, and valid JSON
    "temperature 1e-300 with json_object": ({"temperature": 1e-300, "response_format": {"type": "json_object"}}, 200),
    # a required property that refers back to itself: no finite instance, refused when compiled
    "self-recursive required schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "node", "schema": {"$defs": {"node": {"type": "object", "properties": {"child": {
            "$ref": "#/$defs/node"}}, "required": ["child"]}}, "$ref": "#/$defs/node"}}}}, 400),
}


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_a_bad_request_gets_its_own_answer_while_bystanders_finish(server: Server, name: str) -> None:
    extra, status = TRIGGERS[name]
    bystander = {"model": MODEL, "messages": MESSAGES, "max_tokens": BYSTANDER_TOKENS, "ignore_eos": True,
                 "temperature": 0.7, "seed": 1, "stream_options": {"include_usage": True}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bystanders = [pool.submit(stream_events, server, {**bystander, "seed": i}) for i in range(3)]
        bad = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, **extra})
        assert [bystander_tokens(f.result()) for f in bystanders] == [BYSTANDER_TOKENS] * 3
    assert bad.status_code == status, bad.text
    if status == 200:
        json.loads(bad.json()["choices"][0]["message"]["content"])  # complete, valid JSON
    else:
        assert bad.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def llm(demo_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM("demo", max_model_len=512)


def test_a_failure_in_one_requests_output_ends_that_request_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    original = OutputProcessor.process

    def process(self, seq, state, token, logprob):  # type: ignore[no-untyped-def]
        if seq.params.seed == 666 and seq.num_output_tokens == 5:
            raise UnicodeError("injected: this request's text cannot be decoded")
        return original(self, seq, state, token, logprob)

    monkeypatch.setattr(OutputProcessor, "process", process)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=20, ignore_eos=True) for seed in (1, 666, 2)]
    results = llm.generate(["a", "b", "c"], params)
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert len(results[0].token_ids) == len(results[2].token_ids) == 20
    assert "injected" in (results[1].error or "") and llm.engine.block_manager.usage == 0


def test_a_grammar_that_fails_mid_answer_ends_its_request_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from phi4.structured.grammars import json_object_grammar

    original = Constraint.consume
    first: list[Constraint] = []

    def consume(self, token):  # type: ignore[no-untyped-def]
        if not first:
            first.append(self)
        if self is first[0]:  # the first constrained sequence to sample fails at once
            raise GrammarError("injected: the grammar refused a token")
        return original(self, token)

    monkeypatch.setattr(Constraint, "consume", consume)
    grammar = json_object_grammar()
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=12, grammar=grammar),
              SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=24, grammar=grammar)]
    results = llm.generate(["x", "y", "z"], params)
    assert results[0].finish_reason == "error" and "refused" in (results[0].error or "")
    assert len(results[1].token_ids) == 12 and results[2].finish_reason in ("stop", "length")
    json.loads(results[2].text)


def test_a_request_whose_client_leaves_is_aborted_streamed_or_not(server: Server) -> None:
    def aborted() -> float:
        return server.metric('phi4_requests_total{status="499"}') if "499" in httpx.get(
            f"{server.url}/metrics").text else 0.0

    before = aborted()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True}
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:  # a client that gives up mid-answer
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       + f"Authorization: {server.headers['Authorization']}\r\n".encode()
                       + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        wait_for(lambda: server.metric("phi4_num_requests_running") > 0)  # being answered: then it hangs up
    wait_for(lambda: aborted() > before and server.metric("phi4_num_requests_running") == 0)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=30) as response:
        next(response.iter_lines())  # the stream has begun; then the client hangs up
    wait_for(lambda: server.metric("phi4_num_requests_running") == 0)


def wait_for(condition, attempts: int = 600) -> None:  # type: ignore[no-untyped-def]
    event = threading.Event()
    for _ in range(attempts):
        if condition():
            return
        event.wait(0.1)
    raise AssertionError("the condition never held")


def test_a_huge_prompt_delays_only_itself(server: Server) -> None:
    big = {"model": MODEL, "prompt": "lorem ipsum dolor " * 160_000, "max_tokens": 1}  # 2.9 MB to tokenize
    answered_meanwhile = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.post, "/v1/completions", big)
        while not future.done():
            if httpx.get(f"{server.url}/health", timeout=30).status_code == 200 and not future.done():
                answered_meanwhile += 1
        response = future.result()
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert answered_meanwhile > 0  # /health was served while the prompt was being tokenized


@pytest.fixture(scope="module")
def strict_server(demo_dir) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    """One sequence at a time, a queue of three, one second for headers and each piece of a body."""
    instance = Server("--max-num-seqs", "1", "--max-queue", "3", "--header-timeout", "1", "--body-timeout", "1",
                      api_key=None)
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


def test_the_queue_counts_sequences_and_answers_429_when_full(strict_server: Server) -> None:
    long = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream_events, strict_server, long)
        wait_for(lambda: strict_server.metric("phi4_num_requests_running") == 1)
        waiting = pool.submit(stream_events, strict_server, {**long, "max_tokens": 8, "n": 2})
        wait_for(lambda: strict_server.metric("phi4_num_requests_waiting") == 2)
        too_many = strict_server.post("/v1/chat/completions", {**long, "max_tokens": 8, "n": 2})
        assert too_many.status_code == 429 and too_many.headers["retry-after"]
        assert too_many.json()["error"]["type"] == "rate_limit_error"
        larger_than_queue = strict_server.post("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 2,
                                                                   "max_tokens": 2})
        assert larger_than_queue.status_code == 400
        assert running.result()[-1] == waiting.result()[-1] == "[DONE]"


def test_slow_clients_cannot_hold_a_connection(strict_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as slow_headers:
        slow_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert slow_headers.recv(1024) == b""  # closed by the server
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as slow_body:
        slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\":")
        reply = b""
        while chunk := slow_body.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_after_the_grace_period_every_open_stream_ends_with_an_error_then_done(demo_dir) -> None:  # type: ignore[no-untyped-def]
    server = Server("--max-num-seqs", "1", "--graceful-shutdown-seconds", "1", api_key=None)
    server.wait_ready()
    long = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_events, server, long) for _ in range(3)]
        wait_for(lambda: server.metric("phi4_num_requests_running") == 1
                 and server.metric("phi4_num_requests_waiting") == 2)
        server.process.send_signal(signal.SIGTERM)
        endings = [f.result() for f in streams]
    server.stop()
    assert all(events[-1] == "[DONE]" for events in endings)
    errors = [json.loads(events[-2])["error"] for events in endings if "error" in json.loads(events[-2])]
    assert len(errors) >= 2 and all(e["code"] == "server_shutting_down" for e in errors)  # the two that waited
