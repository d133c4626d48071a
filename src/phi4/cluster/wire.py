"""What crosses from the ingress to a replica: a prepared request without its compiled grammar (a compiled
matcher does not travel; the replica compiles the grammar's text again, from its own cache)."""

from __future__ import annotations

from dataclasses import dataclass

from phi4.engine.client import PreparedRequest
from phi4.sampling_params import SamplingParams


@dataclass(frozen=True)
class WireRequest:
    prompt_token_ids: list[int]
    params: SamplingParams  # params.grammar holds the grammar's text when there is one
    thinking: bool = False

    @classmethod
    def from_prepared(cls, request: PreparedRequest) -> WireRequest:
        return cls(request.prompt_token_ids, request.params, request.thinking)

    def prepared(self) -> PreparedRequest:
        return PreparedRequest(self.prompt_token_ids, self.params, None, self.thinking)
