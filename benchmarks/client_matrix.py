"""Which clients work against `phi4 serve --model demo`, feature by feature: a pass/fail matrix.

Runs each installed client (the openai SDK, LangChain's ChatOpenAI, instructor, litellm's `openai/` and
`hosted_vllm/` providers, lm-evaluation-harness) through what its users do with it, against a demo server
started for the run on loopback, and prints one JSON line per check and a Markdown table. A client that
is not installed is reported as such. Usage: python benchmarks/client_matrix.py
(pip install langchain-openai instructor litellm "lm-eval[api]" to cover them all)
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from live_server import MODEL, Server  # noqa: E402

KEY = "matrix-key"
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


class City(BaseModel):
    name: str
    population: int


def _open(manager: Any) -> list[Any]:
    with manager as stream:
        return list(stream)


def openai_checks(url: str) -> dict[str, Callable[[], Any]]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)

    def tools_round_trip() -> None:
        first = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="required",
                                               max_tokens=60, temperature=0)
        call = first.choices[0].message.tool_calls[0]
        followed = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "12 C"}]
        client.chat.completions.create(model=MODEL, messages=followed, tools=[WEATHER], max_tokens=4)

    return {
        "chat": lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4).choices[0],
        "chat stream": lambda: list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                                   stream=True)),
        "parse (Pydantic)": lambda: client.chat.completions.parse(model=MODEL, messages=MESSAGES, max_tokens=60,
                                                                  response_format=City).choices[0].message.parsed.name,
        "tools round trip": tools_round_trip,
        "responses.create": lambda: client.responses.create(model=MODEL, input="Hi", max_output_tokens=4).output_text,
        "responses.stream": lambda: [event for event in _open(client.responses.stream(model=MODEL, input="Hi",
                                                                                       max_output_tokens=4))],
        "responses.parse": lambda: client.responses.parse(model=MODEL, input="A city", text_format=City,
                                                          max_output_tokens=60).output_parsed.name,
        "completions echo+logprobs": lambda: client.completions.create(
            model=MODEL, prompt="Hello there", max_tokens=0, echo=True, logprobs=1).choices[0].logprobs.token_logprobs[1],
        "models.retrieve": lambda: client.models.retrieve(MODEL).id,
    }


def langchain_checks(url: str) -> dict[str, Callable[[], Any]]:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key=KEY, max_tokens=60, temperature=0)
    responses = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key=KEY, max_tokens=60, use_responses_api=True)
    return {
        "chat": lambda: chat.invoke("Hi").content,
        "chat stream": lambda: list(chat.stream("Hi")),
        "parse (Pydantic)": lambda: chat.with_structured_output(City, method="json_schema").invoke("A city").name,
        "tools round trip": lambda: chat.bind_tools([WEATHER], tool_choice="required").invoke("Oslo?").tool_calls[0],
        # json_mode promises JSON, not the schema (a random model's object rarely fits City)
        "json mode": lambda: json.loads(chat.with_structured_output(City, method="json_mode", include_raw=True)
                                        .invoke("A city as JSON")["raw"].content),
        "function calling": lambda: chat.with_structured_output(City, method="function_calling").invoke("A city").name,
        "responses.create": lambda: responses.invoke("Hi").content,
    }


def instructor_checks(url: str) -> dict[str, Callable[[], Any]]:
    import instructor
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    tools = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    schema = instructor.from_openai(client, mode=instructor.Mode.JSON_SCHEMA)
    return {
        "parse (Pydantic)": lambda: schema.chat.completions.create(model=MODEL, response_model=City, max_tokens=60,
                                                                   messages=MESSAGES, max_retries=0).name,
        "tools round trip": lambda: tools.chat.completions.create(model=MODEL, response_model=City, max_tokens=60,
                                                                  messages=MESSAGES, max_retries=0).name,
    }


def litellm_checks(url: str) -> dict[str, Callable[[], Any]]:
    import litellm

    def call(provider: str, **kwargs: Any) -> Any:
        return litellm.completion(model=f"{provider}/{MODEL}", api_base=f"{url}/v1", api_key=KEY, messages=MESSAGES,
                                  max_tokens=60, **kwargs)

    return {
        "chat": lambda: call("openai").choices[0].message.content,
        "chat stream": lambda: list(call("openai", stream=True)),
        "tools round trip": lambda: call("openai", tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls,
        "parse (Pydantic)": lambda: json.loads(call("openai", response_format=City).choices[0].message.content),
        "hosted_vllm chat": lambda: call("hosted_vllm").choices[0].message.content,
    }


def lm_eval_checks(url: str) -> dict[str, Callable[[], Any]]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    completions = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=MODEL, tokenizer_backend="remote",
                                      auth_token=KEY)
    chat = LocalChatCompletion(base_url=f"{url}/v1/chat/completions", model=MODEL, auth_token=KEY)

    def loglikelihood() -> Any:
        request = Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0)
        [(value, _)] = completions.loglikelihood([request])
        assert value < 0
        return value

    def generate() -> Any:
        request = Instance("generate_until", {}, (JsonChatStr(json.dumps(MESSAGES)),
                                                  {"max_gen_toks": 4, "until": ["\n\n"]}), 0)
        return chat.generate_until([request])

    return {"completions echo+logprobs": loglikelihood, "chat": generate}


CLIENTS = {"openai": openai_checks, "langchain-openai": langchain_checks, "instructor": instructor_checks,
           "litellm": litellm_checks, "lm-eval": lm_eval_checks}


def main() -> None:
    import os

    os.environ.setdefault("OPENAI_API_KEY", KEY)
    server = Server(api_key=KEY)
    server.wait_ready()
    results: dict[str, dict[str, str]] = {}
    try:
        for client, checks in CLIENTS.items():
            try:
                registered = checks(server.url)
            except ImportError as exc:
                results[client] = {"(all)": f"not installed ({exc.name})"}
                continue
            for feature, check in registered.items():
                try:
                    check()
                    outcome = "pass"
                except Exception as exc:  # noqa: BLE001 - a failing client is a finding, not a crash
                    outcome = f"FAIL: {type(exc).__name__}: {str(exc)[:120]}"
                    traceback.print_exc(file=sys.stderr)
                results.setdefault(client, {})[feature] = outcome
                print(json.dumps({"client": client, "feature": feature, "result": outcome}), flush=True)
    finally:
        server.stop()
    features = list(dict.fromkeys(f for checks in results.values() for f in checks))
    print("\n| client | " + " | ".join(features) + " |")
    print("|---|" + "---|" * len(features))
    for client, checks in results.items():
        cells = [checks.get(f, "—").split(":")[0] for f in features]
        print(f"| {client} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
