"""`uniqueItems`, enforced beside the grammar: a token that would complete a repeated item is masked.

llguidance cannot express "no two items equal" as a grammar, so the schema goes to it without the keyword,
and this tracker follows the JSON as it is generated. Inside an array whose schema says `uniqueItems`, it
knows the text since the last finished item; the tokens that would turn that text into a copy of an earlier
item (`, ` and the item, as compact JSON writes it) are banned from the next mask. A string or literal item
is complete at its last character; a number only when something that cannot extend it follows. Items must
be strings, numbers, booleans or null (what Pydantic's `set[...]` fields hold); arrays of objects or arrays
with `uniqueItems` are refused when the schema is compiled.
"""

from __future__ import annotations

import bisect
import codecs
import copy
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from phi4.errors import InvalidRequestError

SCALARS = {"string", "number", "integer", "boolean", "null"}
ITEM_SEPARATOR = ", "  # compact JSON (grammars.COMPACT_JSON): the only text between two items
NUMBER_CHARS = set("0123456789+-.eE")


def has_unique_items(schema: Any) -> bool:
    return any(isinstance(node, dict) and node.get("uniqueItems") is True for node in _walk(schema))


def strip_unique_items(schema: Any) -> Any:
    """The schema as llguidance gets it: without `uniqueItems` (a copy)."""
    stripped = copy.deepcopy(schema)
    for node in _walk(stripped):
        if isinstance(node, dict):
            node.pop("uniqueItems", None)
    return stripped


def _walk(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class SchemaView:
    """The schema nodes that may describe the value at a JSON path (keys, and "*" for array items)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.root = schema
        self._cache: dict[tuple[str, ...], list[dict[str, Any]]] = {(): self._expand(schema)}

    def _resolve(self, ref: str) -> Any:
        node: Any = self.root
        for part in ref.removeprefix("#").strip("/").split("/") if ref != "#" else []:
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
        return node

    def _expand(self, node: Any, depth: int = 0) -> list[dict[str, Any]]:
        """A node and everything it stands for: its $ref target and its anyOf/oneOf/allOf branches."""
        if not isinstance(node, dict) or depth > 32:
            return []
        found = [node]
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            found += self._expand(self._resolve(node["$ref"]), depth + 1)
        for key in ("anyOf", "oneOf", "allOf"):
            for branch in node.get(key) or []:
                found += self._expand(branch, depth + 1)
        return found

    def nodes(self, path: tuple[str, ...]) -> list[dict[str, Any]]:
        if path not in self._cache:
            parent, step = self.nodes(path[:-1]), path[-1]
            children: list[Any] = []
            for node in parent:
                if step == "*":
                    children += [node.get("items")] + list(node.get("prefixItems") or [])
                elif isinstance(node.get("properties"), dict) and step in node["properties"]:
                    children.append(node["properties"][step])
                elif isinstance(node.get("additionalProperties"), dict):
                    children.append(node["additionalProperties"])
            self._cache[path] = [n for child in children for n in self._expand(child)]
        return self._cache[path]

    def unique(self, path: tuple[str, ...]) -> bool:
        return any(node.get("uniqueItems") is True for node in self.nodes(path))

    def item_domain(self, path: tuple[str, ...]) -> list[str] | None:
        """Every item an array at `path` may hold, as compact JSON, when they are few (an enum, booleans,
        null, a small integer range); None when they are unbounded (free strings or numbers)."""
        return finite_domain(self._expand_items(path))

    def _expand_items(self, path: tuple[str, ...]) -> list[dict[str, Any]]:
        return self.nodes((*path, "*"))


SMALL_RANGE = 256


def finite_domain(items: list[dict[str, Any]]) -> list[str] | None:
    for item in items:
        if "enum" in item or "const" in item:
            values = item["enum"] if "enum" in item else [item["const"]]
            return [json.dumps(v, ensure_ascii=False) for v in values]
    kinds = {kind for item in items for kind in ([item["type"]] if isinstance(item.get("type"), str)
                                                 else item.get("type") or [])}
    if kinds == {"boolean"}:
        return ["true", "false"]
    if kinds == {"null"}:
        return ["null"]
    bounds = [(item.get("minimum"), item.get("maximum")) for item in items if item.get("type") == "integer"]
    if kinds == {"integer"} and bounds and all(isinstance(a, int) and isinstance(b, int) for a, b in bounds):
        low, high = max(a for a, _ in bounds), min(b for _, b in bounds)
        if high - low <= SMALL_RANGE:
            return [str(value) for value in range(low, high + 1)]
    return None


def check_unique_items(schema: dict[str, Any], param: str) -> None:
    """Refuse what the tracker cannot enforce (uniqueItems over items that are not scalars), and arrays that
    must hold more distinct items than their items can be."""
    view = SchemaView(schema)
    for node in _walk(schema):
        if not (isinstance(node, dict) and node.get("uniqueItems") is True):
            continue
        items = view._expand(node.get("items", {}))
        domain = finite_domain(items)
        if domain is not None and isinstance(node.get("minItems"), int) and node["minItems"] > len(set(domain)):
            raise InvalidRequestError(f"an array needs {node['minItems']} distinct items but its items can take only "
                                      f"{len(set(domain))} values: the schema has no instance", param)
        kinds: set[str] = set()
        for item in items:
            declared = item.get("type")
            kinds |= {declared} if isinstance(declared, str) else set(declared or [])
            if "enum" in item or "const" in item:
                values = item.get("enum", [item.get("const")])
                kinds |= {"object" if isinstance(v, (dict, list)) else "string" for v in values}
        if not kinds or not kinds <= SCALARS:
            raise InvalidRequestError("uniqueItems is enforced for arrays of strings, numbers, booleans or null; "
                                      "not for arrays of objects, arrays or unconstrained items", param)


def token_bitmask(tokens: Iterable[int], words: int) -> np.ndarray:
    """llguidance's mask layout (bit t % 32 of 32-bit word t // 32) with the given tokens set."""
    ids = np.fromiter(tokens, dtype=np.int64)
    mask = np.zeros(words, dtype=np.uint32)
    np.bitwise_or.at(mask, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    return mask


class TokenIndex:
    """Token texts in sorted order, to find every token that begins with a given string."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        pairs = sorted((raw.decode("utf-8", "replace"), token_id) for token_id, raw in enumerate(token_bytes) if raw)
        self.texts = [text for text, _ in pairs]
        self.ids = [token_id for _, token_id in pairs]
        self.by_id = [raw.decode("utf-8", "replace") for raw in token_bytes]
        self.raw = token_bytes
        self.not_number = frozenset(token for token, text in enumerate(self.by_id)
                                    if text and text[0] not in NUMBER_CHARS)
        self.closing_quote = token_bitmask((token for token, text in enumerate(self.by_id) if text.startswith('"')),
                                           (len(token_bytes) + 31) // 32)  # the tokens that begin with '"'

    def exact(self, text: str) -> list[int]:
        position = bisect.bisect_left(self.texts, text)
        found = []
        while position < len(self.texts) and self.texts[position] == text:
            found.append(self.ids[position])
            position += 1
        return found

    def starting_with(self, prefix: str) -> Iterator[tuple[int, str]]:
        for position in range(bisect.bisect_left(self.texts, prefix), len(self.texts)):
            if not self.texts[position].startswith(prefix):
                return
            yield self.ids[position], self.texts[position]


class _Array:
    def __init__(self, path: tuple[str, ...], unique: bool, anchor: int) -> None:
        self.path = path
        self.unique = unique
        self.anchor = anchor  # where the text since the last finished item begins
        self.items: list[str] = []  # finished items as written
        self.item_start: int | None = None


class UniqueItems:
    """Follows one sequence's JSON; `banned()` lists the tokens that would repeat an item right now."""

    def __init__(self, schema: SchemaView, tokens: TokenIndex) -> None:
        self.schema = schema
        self.tokens = tokens
        self._chars: list[str] = []  # the JSON so far, a character each (a str grown by += is copied each time)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split over tokens
        self._stack: list[_Array | dict[str, Any]] = []  # arrays, and objects as {"path", "key", "expect_key"}
        self._in_string = False
        self._escaped = False
        self._string_is_key = False
        self._key = ""
        self._scalar_start: int | None = None  # a number or literal being written

    def advance(self, token: int) -> None:
        for char in self._decoder.decode(self.tokens.raw[token]):
            self._step(char)

    def _value_path(self) -> tuple[str, ...]:
        if not self._stack:
            return ()
        top = self._stack[-1]
        if isinstance(top, _Array):
            return (*top.path, "*")
        return (*top["path"], top["key"])

    def _step(self, char: str) -> None:
        position = len(self._chars)
        self._chars.append(char)
        top = self._stack[-1] if self._stack else None
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._string_is_key and isinstance(top, dict):
                    top["key"], top["expect_key"] = self._key, False
                else:
                    self._finish_item(position + 1)
            elif self._string_is_key:
                self._key += char
            return
        if self._scalar_start is not None and char not in NUMBER_CHARS and not char.isalpha():
            self._scalar_start = None
            self._finish_item(position)
        if char == '"':
            self._in_string = True
            self._string_is_key = isinstance(top, dict) and top["expect_key"]
            self._key = ""
            if not self._string_is_key:
                self._start_item(position)
        elif char == "{":
            self._stack.append({"path": self._value_path(), "key": "", "expect_key": True})
        elif char == "[":
            path = self._value_path()
            self._stack.append(_Array(path, self.schema.unique(path), position + 1))
        elif char in "]}":
            if self._stack:
                self._stack.pop()
            self._finish_item(position + 1)  # the container was an item of the array around it
        elif char == "," and isinstance(top, dict):
            top["expect_key"] = True
        elif not char.isspace() and char not in ",:" and self._scalar_start is None:
            self._scalar_start = position
            self._start_item(position)

    def _start_item(self, position: int) -> None:
        top = self._stack[-1] if self._stack else None
        if isinstance(top, _Array) and top.item_start is None:
            top.item_start = position

    def _finish_item(self, end: int) -> None:
        top = self._stack[-1] if self._stack else None
        if isinstance(top, _Array) and top.item_start is not None:
            top.items.append("".join(self._chars[top.item_start : end]))
            top.item_start = None
            top.anchor = end

    def banned(self, extendable: Callable[[int], bool]) -> set[int]:
        """The tokens to mask now. `extendable(token)` says whether, after `token`, the grammar allows anything
        but a closing quote: a string that can only end as a copy must not be written up to its end."""
        top = self._stack[-1] if self._stack else None
        if not isinstance(top, _Array) or not top.unique or not top.items:
            return set()
        written = "".join(self._chars[top.anchor :])
        domain = self.schema.item_domain(top.path)
        if domain is not None:
            return self._banned_in_domain(written, top.items, domain)
        banned: set[int] = set()
        for item in top.items:
            target = ITEM_SEPARATOR + item
            if not target.startswith(written):
                continue
            rest = target[len(written) :]
            number = item[-1] in NUMBER_CHARS and item not in ("true", "false", "null")
            if number and not rest:  # the number is written: ban what would end it here
                banned |= self.tokens.not_number
                continue
            for token, text in self.tokens.starting_with(rest):
                if not number or len(text) > len(rest) and text[len(rest)] not in NUMBER_CHARS:
                    banned.add(token)
            if item.startswith('"') and len(rest) > 1:  # the copy's content without its closing quote
                banned |= {token for token in self.tokens.exact(rest[:-1]) if not extendable(token)}
        return banned

    def _banned_in_domain(self, written: str, items: list[str], domain: list[str]) -> set[int]:
        """Items from a few values: a token is banned when every item it could still become is taken,
        so that no item is begun that can only end as a copy (or, all taken, no further item at all)."""
        taken = [ITEM_SEPARATOR + item for item in items]
        free = [ITEM_SEPARATOR + value for value in domain if value not in items]

        def possible(text: str, candidates: list[str]) -> bool:
            return any(c.startswith(text) or (text.startswith(c) and text[len(c)] in ",]}") for c in candidates)

        banned: set[int] = set()
        for copy_of in (c for c in taken if c.startswith(written)):
            rest = copy_of[len(written) :]
            candidates = [(token, rest[:length]) for length in range(1, len(rest))
                          for token in self.tokens.exact(rest[:length])]
            candidates += list(self.tokens.starting_with(rest))
            banned |= {token for token, text in candidates if not possible(written + text, free)}
        return banned

