"""Requests -> llguidance grammars. A grammar that cannot be compiled is an error, never free text."""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance

from phi4.errors import InvalidRequestError


# Compact JSON: "key": value, items separated by ", ", no free whitespace. Free whitespace lets a model
# (and always a model with random weights) pad forever between tokens without saying anything.
COMPACT_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError("a JSON schema must be an object (or true/false)", "response_format")
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": COMPACT_JSON}
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def choice_grammar(choices: list[str]) -> str:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("choice must be a non-empty list of strings", "structured_outputs.choice")
    return llguidance.LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(grammar: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(grammar)


def check(grammar: str, tokenizer: llguidance.LLTokenizer, param: str) -> None:
    """Compile the grammar against the tokenizer; a problem is a 400 that names it."""
    try:
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except Exception as exc:  # malformed grammar text
        problem = str(exc)
    if problem:
        raise InvalidRequestError(f"the {param} cannot be compiled: {problem}", param)


def from_structured_outputs(spec: dict[str, Any]) -> str:
    """vLLM's `structured_outputs` extension: exactly one of choice, regex, grammar (Lark), json."""
    given = [key for key in ("choice", "regex", "grammar", "json") if spec.get(key) is not None]
    if len(given) != 1:
        raise InvalidRequestError("structured_outputs takes exactly one of choice, regex, grammar, json",
                                  "structured_outputs")
    key = given[0]
    value = spec[key]
    if key == "choice":
        return choice_grammar(value)
    if key == "regex":
        return regex_grammar(value)
    if key == "grammar":
        return lark_grammar(value)
    return json_schema_grammar(json.loads(value) if isinstance(value, str) else value)
