"""Requests -> llguidance grammars. A grammar that cannot be compiled is an error, never free text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llguidance

from phi4.errors import InvalidRequestError

# Compact JSON: "key": value, items separated by ", ", no free whitespace. Free whitespace lets a model
# (and always a model with random weights) pad forever between tokens without saying anything.
COMPACT_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
PRIMITIVE_TYPES = {"string", "number", "integer", "boolean", "null"}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks the output to follow, before it becomes an llguidance grammar: `kind` is one of
    json_schema, json_object, regex, choice, lark (Lark as llguidance reads it) or grammar (llguidance's own
    text, as `SamplingParams.grammar` takes it); `param` names the request field an error points at."""

    kind: str
    value: Any = None
    param: str = "response_format"

    def to_grammar(self) -> str:
        try:
            if self.kind == "json_schema":
                return json_schema_grammar(self.value, self.param)
            if self.kind == "json_object":
                return json_object_grammar()
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.value)
            if self.kind == "choice":
                return choice_grammar(self.value, self.param)
            if self.kind == "lark":
                return llguidance.LLMatcher.grammar_from_lark(self.value)
            if self.kind == "grammar":
                return str(self.value)
        except InvalidRequestError:
            raise
        except Exception as exc:  # llguidance's own complaint about the schema, regex or grammar
            raise InvalidRequestError(f"the {self.param} cannot be compiled: {exc}", self.param) from exc
        raise ValueError(f"unknown grammar kind {self.kind!r}")


def after_reasoning(grammar: str, open_tag: str, close_tag: str, thinking: bool, special: bool) -> str:
    """`grammar` for the answer of a reasoning model: free thinking between the tags comes first (optional
    unless the prompt already opened it), then whitespace, then the answer under `grammar`."""
    top = json.loads(grammar)
    answer, *others = top["grammars"]
    answer = {**answer, "name": "answer"}
    if special:  # special tokens are lexemes of their own: free text cannot swallow the closing tag
        thought = f"THOUGHT {close_tag}"
        lark = (f"start: {thought} WS @answer" if thinking else f"start: ({open_tag} {thought} WS)? @answer")
        lark += "\nTHOUGHT: /(.|\\n)*/"
    else:  # plain text: a lazy lexeme ends at the first closing tag
        lark = "start: thought WS @answer" if thinking else f"start: ({json.dumps(open_tag)} thought WS)? @answer"
        lark += f"\nthought[lazy]: /(.|\\n)*{re.escape(close_tag).replace('/', chr(92) + '/')}/"
    lark += "\nWS: /[ \\t\\r\\n]{0,4}/"  # bounded: blank lines cannot pad the budget away
    return json.dumps({"grammars": [{"lark_grammar": lark}, answer, *others]})


def json_schema_grammar(schema: dict[str, Any] | bool, param: str = "response_format") -> str:
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError("a JSON schema must be an object (or true/false)", param)
    if not has_finite_instance(schema):
        raise InvalidRequestError(
            "the JSON schema has no finite instance (a required property or item refers back to itself, "
            "or the schema is false), so no answer could ever be complete", param)
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": COMPACT_JSON}
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def choice_grammar(choices: list[str], param: str = "structured_outputs.choice") -> str:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("choice must be a non-empty list of strings", param)
    return llguidance.LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(grammar: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(grammar)


def from_structured_outputs(spec: dict[str, Any]) -> GrammarSpec:
    """vLLM's `structured_outputs` extension: exactly one of choice, regex, grammar (Lark), json."""
    given = [key for key in ("choice", "regex", "grammar", "json") if spec.get(key) is not None]
    if len(given) != 1:
        raise InvalidRequestError("structured_outputs takes exactly one of choice, regex, grammar, json",
                                  "structured_outputs")
    key = given[0]
    value = spec[key]
    param = "structured_outputs"
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {exc}", param) from exc
        return GrammarSpec("json_schema", value, param)
    return GrammarSpec({"choice": "choice", "regex": "regex", "grammar": "lark"}[key], value, param)


def has_finite_instance(schema: Any, budget: int = 10_000) -> bool:
    """Whether some finite JSON value satisfies the schema's structure. Only clear cases count as infinite:
    a `false` schema, or a cycle of `$ref`s through required properties or non-empty arrays with no way
    out; anything this check does not understand is taken as satisfiable (llguidance judges the rest)."""
    root = schema
    steps = 0

    def resolve(ref: str) -> Any:
        if ref == "#":
            return root
        if not ref.startswith("#/"):
            return True  # remote references: not ours to judge
        node: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return True  # llguidance reports a dangling reference itself
            node = node[part]
        return node

    def finite(node: Any, visiting: frozenset[str]) -> bool:
        nonlocal steps
        steps += 1
        if steps > budget:
            return True
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return True
        if "$ref" in node and isinstance(node["$ref"], str):
            ref = node["$ref"]
            if ref in visiting or not finite(resolve(ref), visiting | {ref}):
                return False
        if "const" in node or "enum" in node:
            return True
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key] and not any(finite(b, visiting) for b in node[key]):
                return False
        if isinstance(node.get("allOf"), list) and not all(finite(b, visiting) for b in node["allOf"]):
            return False
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        if types & PRIMITIVE_TYPES:
            return True
        if "object" in types or (not types and "properties" in node):
            properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            required = node.get("required") if isinstance(node.get("required"), list) else []
            if not all(finite(properties[name], visiting) for name in required if name in properties):
                return False
        if "array" in types:
            minimum = node.get("minItems", 0) if isinstance(node.get("minItems", 0), int) else 0
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            items = node.get("items", True)
            needed = [prefix[i] if i < len(prefix) else items for i in range(min(minimum, len(prefix) + 1))]
            if not all(finite(item, visiting) for item in needed):
                return False
        return True

    return finite(schema, frozenset())
