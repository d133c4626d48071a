"""Structured outputs through the server with the `openai` client: every output that claims a format has
it, even from the demo's random weights at temperature 1.0."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from live_server import MODEL, Server
from structured_corpus import SCHEMAS

MESSAGES = [{"role": "user", "content": "Reply in the requested format."}]
SEEDS = (1, 2, 3)


def schema_format(name: str, schema: dict, strict: bool) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def answer(client: openai.OpenAI, stream: bool, **kwargs: object) -> tuple[str, str]:
    """(text, finish_reason), streamed or not."""
    args = {"model": MODEL, "messages": MESSAGES, "temperature": 1.0, "max_tokens": 96, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]  # type: ignore[arg-type]
        return choice.message.content or "", choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **args) if c.choices]  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_every_output_of_the_schema_corpus_parses_and_validates(client: openai.OpenAI) -> None:
    assert len(SCHEMAS) >= 40
    jobs = [(name, seed, stream) for name in SCHEMAS for seed in SEEDS for stream in (False, True)]

    def run(job: tuple[str, int, bool]) -> tuple[str, str, str]:
        name, seed, stream = job
        # Enforced whether strict is true or not.
        text, finish = answer(client, stream, seed=seed,
                              response_format=schema_format(name, SCHEMAS[name], strict=seed % 2 == 0))
        return name, text, finish

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    failures = []
    for name, text, finish in results:
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            assert finish == "stop"
        except Exception as exc:  # collect them all for one readable failure
            failures.append(f"{name}: {exc!s:.120} in {text[:120]!r}")
    assert not failures, "\n".join(failures)


def test_same_seed_same_structured_output_streaming_or_not(client: openai.OpenAI) -> None:
    response_format = schema_format("invoice", SCHEMAS["invoice"], strict=True)
    assert answer(client, False, seed=9, response_format=response_format) == \
        answer(client, True, seed=9, response_format=response_format)


def test_json_object_gives_an_object(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        text, finish = answer(client, False, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(text), dict) and finish == "stop"


def test_a_top_level_enum_gives_exactly_one_of_its_values(client: openai.OpenAI) -> None:
    values = ["positive", "negative", "neutral"]
    for seed in range(4):
        text, _ = answer(client, False, seed=seed, response_format=schema_format("label", {"enum": values}, True))
        assert json.loads(text) in values


def test_vllm_structured_outputs_choice_regex_grammar_json(client: openai.OpenAI) -> None:
    def extra(**spec: object) -> dict:
        return {"extra_body": {"structured_outputs": spec}}

    for seed in SEEDS:
        text, _ = answer(client, False, seed=seed, **extra(choice=["yes", "no", "maybe"]))
        assert text in ("yes", "no", "maybe")
        text, _ = answer(client, False, seed=seed, **extra(regex=r"[A-Z]{3}-[0-9]{2}"))
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", text)
        text, _ = answer(client, False, seed=seed, **extra(grammar='start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'))
        assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", text)
        text, _ = answer(client, False, seed=seed, **extra(json=SCHEMAS["sentiment"]))
        jsonschema.validate(json.loads(text), SCHEMAS["sentiment"])


def test_a_tight_token_budget_still_closes_the_json(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        text, finish = answer(client, False, seed=seed, max_tokens=48,  # closing from the first token
                              response_format=schema_format("customer", SCHEMAS["nested_customer"], True))
        jsonschema.validate(json.loads(text), SCHEMAS["nested_customer"])
        assert finish == "stop"


def test_constrained_and_free_requests_share_a_batch_without_changing_the_free_ones(client: openai.OpenAI) -> None:
    free = dict(seed=77, max_tokens=24)
    alone = answer(client, False, **free)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(answer, client, False, seed=s, response_format=schema_format(
            "product", SCHEMAS["product"], True)) for s in range(5)]
        together = pool.submit(answer, client, False, **free)
        for future in constrained:
            jsonschema.validate(json.loads(future.result()[0]), SCHEMAS["product"])
        assert together.result() == alone


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: UNDEFINED_RULE"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
])
def test_a_format_that_cannot_be_compiled_is_400(server: Server, body: dict, param: str) -> None:
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_text_completions_take_structured_outputs_too(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=10, temperature=1.0,
                                           seed=3, extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert completion.choices[0].text in ("left", "right")


TREE = {"$defs": {"node": {"type": "object", "properties": {
    "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["label", "children"]}}, "$ref": "#/$defs/node"}


def test_a_recursive_schema_ends_complete_within_its_budget(client: openai.OpenAI) -> None:
    """Each node requires an array of nodes: the closing narrowing must choose the empty array, not a new node."""
    for seed in range(1, 9):
        text, finish = answer(client, False, seed=seed, max_tokens=80, response_format=schema_format("tree", TREE, True))
        jsonschema.validate(json.loads(text), TREE)
        assert finish == "stop"


def test_unique_items_never_repeat_an_item(client: openai.OpenAI) -> None:
    """Pydantic's set[...] fields: uniqueItems over strings, enums, small integer ranges, booleans and numbers."""
    from pydantic import BaseModel, Field
    from typing import Literal

    class Tags(BaseModel):
        colors: set[Literal["red", "green", "blue", "cyan"]] = Field(min_length=3)
        digits: set[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0, "maximum": 3}},
                                 min_length=3)
        words: set[str] = Field(json_schema_extra={"items": {"type": "string", "maxLength": 3}}, min_length=4)
        flags: set[bool]
        scores: set[float] = Field(min_length=3)

    schema = Tags.model_json_schema()
    for seed in range(1, 13):
        text, finish = answer(client, False, seed=seed, max_tokens=160, response_format=schema_format("tags", schema,
                                                                                                     False))
        value = json.loads(text)
        assert all(len({json.dumps(v) for v in value[key]}) == len(value[key]) for key in value), text
        assert finish == "stop" and Tags.model_validate(value)


@pytest.mark.parametrize("schema, reason", [
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True}, "arrays of strings"),
    ({"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True, "minItems": 3}, "distinct items"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
])
def test_what_cannot_be_enforced_is_refused_by_name(server: Server, schema: dict, reason: str) -> None:
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                    "response_format": schema_format("x", schema, True)})
    assert response.status_code == 400 and reason in response.json()["error"]["message"], response.text
