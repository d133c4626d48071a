"""Per-sequence grammar state (`Constraint`), and the next-token masks of a batch.

A model can ramble inside a JSON string or number for as long as it likes, and a model with random
weights always does: the output would hit its token budget half-written. So when few tokens are left
(`CLOSING_TOKENS`), the mask narrows, among what the grammar allows, to the first non-empty tier of
tokens that close what is open (`"`, `}`, `]`), separate (`,`, `:`), end an address part (`@`, `.`), are
empty values that open nothing (`[]`, `{}`, `""`: without them a recursive schema nests deeper at every
required array), or are short values (one digit, `true`, `false`, `null`), in an order that depends on
whether the grammar is inside free text; only when none is allowed, to all it allows. The grammar still
decides what is valid; the narrowing only chooses the shortest way out, so a request that claims a
format gets it, complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from phi4.structured.unique import UniqueItems, token_bitmask

CLOSING_TOKENS = 48
_PATTERNS = {
    "quote_and_close": re.compile(r'^"[\]}]+\Z'),  # ends a string and the structures around it
    "quote": re.compile(r'^"\Z'),
    "close": re.compile(r"^[\]}>]+\Z"),  # `>` ends a tag such as </tool_call>
    "close_spaced": re.compile(r"^\s*[\]}]+\s*\Z"),
    "separator": re.compile(r"^\s*[,:]\s*\Z"),
    # an empty array, object or string, and whatever closes after it: a value that opens nothing
    "empty": re.compile(r'^\s*(?:\[\]|\{\}|"")[\]},]*\s*\Z'),
    "joiner": re.compile(r"^[@.]\Z"),  # ends the open part of an e-mail address or a host name
    "short_value": re.compile(r"^\s*(?:[0-9]|true|false|null)\s*\Z"),
}
# Inside free text `}` is just a character, so there the quote comes first; outside it, closing brackets.
# Ending the output (EOS, once the grammar accepts) beats everything.
_IN_TEXT_ORDER = ("end", "quote_and_close", "quote", "joiner", "close", "close_spaced", "separator", "empty",
                  "short_value")
_STRUCTURE_ORDER = ("end", "quote_and_close", "close", "close_spaced", "separator", "empty", "short_value", "quote",
                    "joiner")


class GrammarError(RuntimeError):
    """A sequence's grammar refused a token or could not compute its mask: that request ends with it."""


@dataclass
class Constraint:
    """One sequence's position in its grammar (a copy of the compiled matcher: see GrammarService), and
    the tracker of `uniqueItems` arrays when its JSON schema has any."""

    matcher: llguidance.LLMatcher
    unique: UniqueItems | None = None
    finished: bool = field(default=False)

    def fill(self, bitmask_row: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed: {self.matcher.get_error()}")
        if self.unique is not None and (banned := self.unique.banned(self._extendable)):
            row = bitmask_row.numpy().view(np.uint32)
            row &= ~token_bitmask(banned, bitmask_row.numel())

    def _extendable(self, token: int) -> bool:
        """Whether, after `token`, the grammar allows something other than a closing quote (a lookahead on a copy
        of the matcher, for uniqueItems)."""
        ahead = self.matcher.deep_copy()
        if not ahead.consume_token(token):
            return True  # the grammar refuses it anyway
        assert self.unique is not None
        allowed = np.frombuffer(ahead.compute_bitmask(), dtype=np.uint32).copy()
        closing = self.unique.tokens.closing_quote
        words = min(len(allowed), len(closing))
        allowed[:words] &= ~closing[:words]
        return bool(allowed.any())

    def consume(self, token: int) -> None:
        """Advance past the sampled token; the grammar is done once it accepts nothing more."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.unique is not None:
            self.unique.advance(token)
        self.finished = self.matcher.is_stopped()


class ClosingTiers:
    """Token-id masks of the tokens that end structures soonest, tried in order."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.masks = {name: torch.zeros(vocab_size, dtype=torch.bool) for name in (*_PATTERNS, "end")}
        self.masks["end"][sorted(eos_token_ids)] = True
        letters = torch.zeros(vocab_size, dtype=torch.bool)
        for token_id, raw in enumerate(token_bytes[:vocab_size]):
            text = raw.decode("utf-8", "replace")
            for name, pattern in _PATTERNS.items():
                if pattern.match(text):
                    self.masks[name][token_id] = True
                    break
            if len(text) == 1 and text.isalpha():
                letters[token_id] = True
        self.letters = letters

    def narrow(self, allowed: torch.Tensor) -> torch.Tensor:
        """allowed [V] -> the first tier's share of it that is not empty, else allowed itself."""
        order = _IN_TEXT_ORDER if bool((allowed & self.letters).any()) else _STRUCTURE_ORDER
        for name in order:
            narrowed = allowed & self.masks[name]
            if bool(narrowed.any()):
                return narrowed
        return allowed


@dataclass(frozen=True)
class BatchMasks:
    """[B, V] bool of the tokens each row may take (all True for unconstrained rows), and the rows whose
    grammar failed (their message): those requests end with the error, the others are sampled."""

    allowed: torch.Tensor
    failed: dict[int, str]


def allowed_tokens(
    constraints: list[Constraint | None],
    closing: list[bool],
    vocab_size: int,
    tiers: ClosingTiers,
    device: torch.device,
) -> BatchMasks | None:
    """The batch's masks, or None if no row is constrained. Masks are computed on the CPU by llguidance and
    applied on the logits' device."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    failed: dict[int, str] = {}
    for slot, row in enumerate(rows):
        try:
            constraints[row].fill(bitmask[slot])  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - one grammar's failure is its request's alone
            failed[row] = str(exc)
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(len(rows), -1)[:, :vocab_size]
    allowed = torch.ones(len(constraints), vocab_size, dtype=torch.bool)
    allowed[rows] = bits
    for row in rows:
        if closing[row]:
            allowed[row] = tiers.narrow(allowed[row])
    for row in failed:
        allowed[row] = True  # sampled like any row, then ended with its error
    return BatchMasks(allowed.to(device), failed)
