"""A request as the engine tracks it, and what the engine reports back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from phi4.engine.sampling import TokenLogprob
from phi4.sampling_params import SamplingParams
from phi4.structured.constraint import GrammarConstraint
from phi4.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer
    # Prompt and generated tokens. After a preemption they are all recomputed as if they were the prompt.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    constraint: GrammarConstraint | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    text: str = ""  # the visible text so far, cut before a stop string once one appears
    num_emitted_chars: int = 0  # how much of `text` has been reported; the rest may begin a stop string

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """One step's news about a request: the tokens and text it produced, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]  # one per new token when the request asked for logprobs, else empty
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop token), "length", "abort" once finished
    prompt_token_ids: list[int]
    num_output_tokens: int


@dataclass(frozen=True)
class CompletionResult:
    """A finished request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
