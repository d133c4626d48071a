"""GrammarService: the one owner of structured outputs in an engine.

It holds llguidance's view of the vocabulary, the closing tiers, and a cache of compiled grammars: a
grammar is checked and compiled once (hundreds of microseconds for a JSON schema), and every sequence that
follows it gets a copy of the compiled matcher (microseconds). Requests hand it `GrammarSpec`s or grammar
text when they are prepared (off the event loop); each sequence gets a `Constraint`; the runner asks it for
the batch's masks; the output side asks a constraint whether it is finished. Nobody else compiles grammars.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llguidance
import torch

from phi4.errors import InvalidRequestError
from phi4.structured.constraint import BatchMasks, ClosingTiers, Constraint, allowed_tokens
from phi4.structured.grammars import GrammarSpec
from phi4.structured.unique import SchemaView, TokenIndex, UniqueItems, check_unique_items, has_unique_items, \
    strip_unique_items

CACHED_GRAMMARS = 256


@dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar and its compiled matcher, from which each sequence's matcher is copied; and, for a
    JSON schema with `uniqueItems`, the schema that the items' tracker follows (structured/unique.py)."""

    text: str
    matcher: llguidance.LLMatcher
    unique: SchemaView | None = None


class GrammarService:
    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: frozenset[int],
                 token_bytes: list[bytes]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._token_bytes = token_bytes
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tiers: ClosingTiers | None = None
        self._compiled: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._token_index: TokenIndex | None = None  # built on the first grammar with uniqueItems
        self._lock = threading.Lock()  # requests are prepared on several threads at once

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on the first grammar (about 0.5 s)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(str(self._tokenizer_json), n_vocab=self.vocab_size,
                                                         eos_token=sorted(self._eos_token_ids))
                self._tiers = ClosingTiers(self._token_bytes, self.vocab_size, self._eos_token_ids)
            return self._tokenizer

    def compile(self, spec: GrammarSpec | str, param: str = "grammar") -> CompiledGrammar:
        """Check and compile (once per distinct grammar); a problem is an InvalidRequestError naming `param`."""
        if isinstance(spec, GrammarSpec):
            param = spec.param
            text = spec.to_grammar()
        else:
            text = spec
        with self._lock:
            cached = self._compiled.get(text)
            if cached is not None:
                self._compiled.move_to_end(text)
                return cached
        tokenizer = self.tokenizer
        llguidance_text, unique = _split_unique_items(text, param)
        try:
            problem = llguidance.LLMatcher.validate_grammar(llguidance_text, tokenizer)
        except Exception as exc:  # noqa: BLE001 - malformed grammar text
            problem = str(exc)
        if problem:
            raise InvalidRequestError(f"the {param} cannot be compiled: {problem}", param)
        matcher = llguidance.LLMatcher(tokenizer, llguidance_text)
        if matcher.is_error():
            raise InvalidRequestError(f"the {param} cannot be compiled: {matcher.get_error()}", param)
        compiled = CompiledGrammar(text, matcher, unique)
        with self._lock:
            self._compiled[text] = compiled
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def constraint(self, compiled: CompiledGrammar) -> Constraint:
        unique = None
        if compiled.unique is not None:
            with self._lock:
                if self._token_index is None:
                    self._token_index = TokenIndex(self._token_bytes[: self.vocab_size])
            unique = UniqueItems(compiled.unique, self._token_index)
        return Constraint(compiled.matcher.deep_copy(), unique)

    def masks(self, constraints: list[Constraint | None], closing: list[bool], device: torch.device) -> BatchMasks | None:
        """The next-token masks of a batch's sampled rows (see constraint.allowed_tokens)."""
        assert self._tiers is not None, "a constraint exists only after a grammar was compiled"
        return allowed_tokens(constraints, closing, self.vocab_size, self._tiers, device)


def _split_unique_items(grammar: str, param: str) -> tuple[str, SchemaView | None]:
    """(the grammar as llguidance gets it, the schema whose uniqueItems phi4 enforces itself). uniqueItems is
    enforced for a grammar that is one JSON schema (response_format); elsewhere it is refused."""
    if "uniqueItems" not in grammar:
        return grammar, None
    top = json.loads(grammar)
    grammars = top.get("grammars", [])
    holders = [g for g in grammars if has_unique_items(g)]
    if not holders:
        return grammar, None
    if len(grammars) != 1 or "json_schema" not in grammars[0]:
        raise InvalidRequestError("uniqueItems is enforced for a response format's JSON schema; not inside tool "
                                  "parameters' grammars, Lark grammars or a reasoning model's answer", param)
    schema = grammars[0]["json_schema"]
    check_unique_items(schema, param)
    stripped = {**top, "grammars": [{**grammars[0], "json_schema": strip_unique_items(schema)}]}
    return json.dumps(stripped), SchemaView(schema)
