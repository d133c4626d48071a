"""A live `phi4 serve --model demo` on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from live_server import API_KEY, MAX_MODEL_LEN, MODEL, Server, free_port
from phi4.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Explain quantum entanglement in one sentence."}]


def chat(client: openai.OpenAI, **kwargs: object):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", MESSAGES), **kwargs)  # type: ignore[arg-type]


def stream_text(client: openai.OpenAI, **kwargs: object) -> tuple[str, list]:
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def prompt_tokens(server: Server, messages: list[dict]) -> int:
    return server.post("/tokenize", {"messages": messages}).json()["count"]


def test_chat_completion_has_openais_shape_and_true_usage(client: openai.OpenAI, server: Server) -> None:
    response = chat(client, max_completion_tokens=12, temperature=0)
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.id.startswith("chatcmpl") and response.system_fingerprint and response.created > 0
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == prompt_tokens(server, MESSAGES)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    detokenized = server.post("/tokenize", {"prompt": choice.message.content}).json()["count"]
    assert detokenized >= 1


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    response = chat(client, max_completion_tokens=3, max_tokens=9, temperature=0)
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"
    assert chat(client, max_tokens=5, temperature=0).usage.completion_tokens == 5


def test_temperature_zero_is_deterministic_streaming_or_not(client: openai.OpenAI) -> None:
    first = chat(client, max_completion_tokens=16, temperature=0).choices[0].message.content
    assert chat(client, max_completion_tokens=16, temperature=0).choices[0].message.content == first
    assert stream_text(client, max_completion_tokens=16, temperature=0)[0] == first


def test_same_seed_same_text_streaming_and_not_while_other_traffic_runs(client: openai.OpenAI) -> None:
    kwargs = dict(max_completion_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    alone = chat(client, **kwargs).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(chat, client, max_completion_tokens=30, temperature=1.0,
                             messages=[{"role": "user", "content": f"other traffic {i} " * (i + 1)}]) for i in range(3)]
        streamed = pool.submit(stream_text, client, **kwargs)
        for f in noise:
            f.result()
        assert streamed.result()[0] == alone
    assert chat(client, **{**kwargs, "seed": 4321}).choices[0].message.content != alone


def test_stop_strings_never_appear_also_split_across_tokens_in_a_stream(client: openai.OpenAI, server: Server) -> None:
    free = chat(client, max_completion_tokens=20, temperature=0, logprobs=True)
    tokens = [entry.token for entry in free.choices[0].logprobs.content]
    text = free.choices[0].message.content
    start = len("".join(tokens[:4]))
    stop = text[start - 2 : start + 2]  # the end of token 4 and the start of token 5
    assert len(stop) == 4 and text.find(stop) == start - 2
    response = chat(client, max_completion_tokens=20, temperature=0, stop=[stop, "zzzz-never"])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == text[: start - 2]
    streamed, chunks = stream_text(client, max_completion_tokens=20, temperature=0, stop=stop)
    assert streamed == text[: start - 2]
    assert all(stop not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_logprobs_agree_with_the_returned_tokens(client: openai.OpenAI) -> None:
    response = chat(client, max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert joined == response.choices[0].message.content


def test_n_gives_n_choices_and_seeded_choice_zero_matches_n_one(client: openai.OpenAI) -> None:
    response = chat(client, n=3, max_completion_tokens=10, temperature=1.0, seed=99)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 30
    single = chat(client, n=1, max_completion_tokens=10, temperature=1.0, seed=99)
    assert response.choices[0].message.content == single.choices[0].message.content
    assert len({c.message.content for c in response.choices}) > 1


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, demo_dir: Path) -> None:
    forced = chat(client, max_completion_tokens=5, temperature=1.0, logit_bias={"15339": 100}, logprobs=True)
    assert [e.token for e in forced.choices[0].logprobs.content] == ["hello"] * 5
    first = chat(client, max_completion_tokens=1, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    ids_by_bytes = {b: i for i, b in enumerate(Tokenizer(demo_dir).token_bytes)}
    top_id = ids_by_bytes[bytes(first.bytes)]
    banned = chat(client, max_completion_tokens=1, temperature=0, logprobs=True, logit_bias={str(top_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token


def test_frequency_penalty_breaks_a_repetition_that_presence_penalty_alone_does_not(client: openai.OpenAI) -> None:
    def hellos(**kwargs: object) -> int:
        response = chat(client, max_completion_tokens=40, temperature=0, logit_bias={"15339": 50}, logprobs=True,
                        **kwargs)
        return [e.token for e in response.choices[0].logprobs.content].count("hello")

    assert hellos() == 40
    assert hellos(presence_penalty=2.0) == 40  # a one-off 2.0 does not outweigh a bias of 50
    assert 1 <= hellos(frequency_penalty=2.0) < 40  # 2.0 per repetition does, after enough of them


def test_text_completions_take_strings_lists_and_token_ids_with_echo(client: openai.OpenAI, server: Server) -> None:
    one = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert one.object == "text_completion" and one.usage.completion_tokens == 6
    ids = server.post("/tokenize", {"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + one.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 12
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == one.choices[0].text


def test_stream_sends_role_content_finish_usage_then_done(server: Server) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": MESSAGES, "stop": [str(i) for i in range(17)]}, "stop"),  # > --max-stop-sequences
    ({"model": MODEL, "messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": MESSAGES, "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "messages": MESSAGES, "n": 0}, "n"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
])
def test_bad_parameters_are_400_naming_the_parameter(server: Server, body: dict, param: str) -> None:
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_is_400(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope", headers=server.headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_context_length_exceeded_gives_both_numbers(server: Server) -> None:
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"] and "2000" in error["message"]
    long_prompt = [{"role": "user", "content": "word " * 1500}]
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": long_prompt})
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_is_404_and_wrong_key_is_401(server: Server) -> None:
    response = server.post("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    wrong = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_oversized_body_is_refused_before_parsing(server: Server) -> None:
    response = server.post("/v1/chat/completions",
                           {"model": MODEL, "messages": [{"role": "user", "content": "x" * (9 << 20)}]})
    assert response.status_code == 413


def test_models_health_tokenize_detokenize(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    tokens = server.post("/tokenize", {"prompt": "Hello world"}).json()["tokens"]
    assert tokens == [9906, 1917]
    assert server.post("/detokenize", {"tokens": tokens}).json()["prompt"] == "Hello world"
    assert httpx.get(f"{server.url}/api/v1/models", headers=server.headers).json()["data"][0]["id"] == MODEL


def test_client_disconnect_mid_stream_frees_its_blocks(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "disconnect " * 50}], "max_tokens": 500,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metric("phi4_num_requests_running") == 1
        assert server.metric("phi4_kv_cache_usage_ratio") > 0
    deadline = time.monotonic() + 10
    while server.metric("phi4_kv_cache_usage_ratio") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("phi4_kv_cache_usage_ratio") == 0
    assert server.metric("phi4_num_requests_running") == 0


def test_metrics_count_requests_tokens_and_latencies(server: Server, client: openai.OpenAI) -> None:
    before = server.metric("phi4_generation_tokens_total")
    chat(client, max_completion_tokens=7, temperature=0)
    assert server.metric("phi4_generation_tokens_total") == before + 7
    text = httpx.get(f"{server.url}/metrics").text
    for name in ('phi4_requests_total{status="200"}', "phi4_prompt_tokens_total", "phi4_num_requests_waiting",
                 "phi4_time_to_first_token_seconds_bucket", "phi4_inter_token_latency_seconds_count"):
        assert name in text


def test_a_bad_request_never_disturbs_another(client: openai.OpenAI, server: Server) -> None:
    kwargs = dict(max_completion_tokens=30, temperature=1.0, seed=5)
    expected = chat(client, **kwargs).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        good = pool.submit(stream_text, client, **kwargs)
        bad = [pool.submit(server.post, "/v1/chat/completions", body) for body in (
            {"model": MODEL, "messages": MESSAGES, "temperature": -1},
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1500}]},
            {"model": MODEL, "messages": MESSAGES, "logit_bias": {"999999": 5}},
        )]
        assert [f.result().status_code for f in bad] == [400, 400, 400]
        assert good.result()[0] == expected


def test_the_readme_curl_example_works_as_written(server: Server) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    command = re.search(r"```bash\n(curl http://127\.0\.0\.1:8000/api/v1/chat/completions.*?)\n```", readme, re.S)
    assert command, "the README shows the seed's curl example"
    script = command.group(1).replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    # As written it asks for no limit (the demo would talk to the end of its context): a test keeps it short.
    script = script.replace("]}'", '], "max_tokens": 8}\'')
    assert '"max_tokens": 8' in script
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KEY": API_KEY})
    body = json.loads(result.stdout)
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] > 0


def test_a_model_that_cannot_load_ends_the_server_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phi4.cli", "serve", "--model", str(tmp_path / "missing-checkpoint"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "could not load" in result.stderr and "missing-checkpoint" in result.stderr


@pytest.mark.parametrize("fleet", [[], ["--replicas", "2"]], ids=["one process", "fleet"])
def test_a_port_already_taken_ends_the_server_at_once_with_the_reason(fleet: list[str]) -> None:
    """Before the model loads (and, for a fleet, before Ray starts): not after, with a C++ abort on the way out
    (one process: uvicorn bound only once the load had begun) or a HAProxy traceback (a fleet)."""
    if fleet:
        pytest.importorskip("ray.serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "phi4.cli", "serve", "--model", "demo", "--port", str(port),
                                 *fleet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "loaded" not in result.stderr and "Traceback" not in result.stderr


def test_a_host_that_is_not_this_machines_ends_the_server_with_the_reason() -> None:
    result = subprocess.run([sys.executable, "-m", "phi4.cli", "serve", "--model", "demo", "--host", "198.51.100.7",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot listen on 198.51.100.7:" in result.stderr
    assert "another server" not in result.stderr  # the hint is for a port that is taken
