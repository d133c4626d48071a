"""What crosses from the ingress to a replica: a prepared request without its compiled grammar (a compiled
matcher does not travel; the replica compiles the grammar's text again, from its own cache)."""

from __future__ import annotations

from dataclasses import dataclass

from phi4.engine.client import PreparedRequest
from phi4.sampling_params import SamplingParams
from phi4.structured.service import GrammarService


@dataclass(frozen=True)
class WireRequest:
    prompt_token_ids: list[int]
    params: SamplingParams  # params.grammar holds the grammar's text when there is one
    thinking: bool = False

    @classmethod
    def from_prepared(cls, request: PreparedRequest) -> WireRequest:
        return cls(request.prompt_token_ids, request.params, request.thinking)

    def prepared(self, grammars: GrammarService) -> PreparedRequest:
        """The request as the replica's engine takes it, its grammar compiled (a cache hit but the first time)."""
        grammar = grammars.compile(self.params.grammar) if self.params.grammar is not None else None
        return PreparedRequest(self.prompt_token_ids, self.params, grammar, self.thinking)
