"""GrammarService: the one owner of structured outputs in an engine.

It holds llguidance's view of the vocabulary, the closing tiers, and a cache of compiled grammars: a
grammar is checked and compiled once (hundreds of microseconds for a JSON schema), and every sequence that
follows it gets a copy of the compiled matcher (microseconds). Requests hand it `GrammarSpec`s or grammar
text when they are prepared (off the event loop); each sequence gets a `Constraint`; the runner asks it for
the batch's masks; the output side asks a constraint whether it is finished. Nobody else compiles grammars.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llguidance
import torch

from phi4.errors import InvalidRequestError
from phi4.structured.constraint import BatchMasks, ClosingTiers, Constraint, allowed_tokens
from phi4.structured.grammars import GrammarSpec

CACHED_GRAMMARS = 256


@dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar and its compiled matcher, from which each sequence's matcher is copied."""

    text: str
    matcher: llguidance.LLMatcher


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
        try:
            problem = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        except Exception as exc:  # noqa: BLE001 - malformed grammar text
            problem = str(exc)
        if problem:
            raise InvalidRequestError(f"the {param} cannot be compiled: {problem}", param)
        matcher = llguidance.LLMatcher(tokenizer, text)
        if matcher.is_error():
            raise InvalidRequestError(f"the {param} cannot be compiled: {matcher.get_error()}", param)
        compiled = CompiledGrammar(text, matcher)
        with self._lock:
            self._compiled[text] = compiled
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    @staticmethod
    def constraint(compiled: CompiledGrammar) -> Constraint:
        return Constraint(compiled.matcher.deep_copy())

    def masks(self, constraints: list[Constraint | None], closing: list[bool], device: torch.device) -> BatchMasks | None:
        """The next-token masks of a batch's sampled rows (see constraint.allowed_tokens)."""
        if all(c is None for c in constraints):
            return None
        assert self._tiers is not None, "a constraint exists only after a grammar was compiled"
        return allowed_tokens(constraints, closing, self.vocab_size, self._tiers, device)
