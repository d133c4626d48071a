"""A request as the scheduler and sampler track it, and what the engine reports back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from phi4.engine.sampling import TokenLogprob
from phi4.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Scheduling and sampling state only; what its tokens mean as text is engine/output.py's business."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    # Prompt and generated tokens. After a preemption they are all recomputed as if they were the prompt.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it was first admitted
    # Entry i: token i's log-probability given tokens < i (entry 0 is None), as the prefill reaches it.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

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

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens


@dataclass(frozen=True)
class RequestOutput:
    """One step's news about a request: the tokens and text it produced, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]  # one per new token when the request asked for logprobs, else empty
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop token), "length", "abort", "error" once finished
    prompt_token_ids: list[int]
    num_output_tokens: int
    error: str | None = None  # why this request (and only it) failed, with finish_reason "error"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the request's first output, when asked
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one, as if the engine had produced them in one step: their tokens,
    text and log-probabilities in order, the prompt's log-probabilities from the first that has them, and
    the state (finished, why, how many tokens) of the last."""
    first, last = outputs[0], outputs[-1]
    if len(outputs) == 1:
        return first
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(
        request_id=first.request_id, new_token_ids=[t for o in outputs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outputs), new_logprobs=[lp for o in outputs for lp in o.new_logprobs],
        finished=last.finished, finish_reason=last.finish_reason, prompt_token_ids=first.prompt_token_ids,
        num_output_tokens=last.num_output_tokens, error=last.error, prompt_logprobs=prompt_logprobs,
        num_cached_tokens=last.num_cached_tokens)


@dataclass(frozen=True)
class CompletionResult:
    """A finished request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length", or "error" (then `error` says why; the other requests went on)
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
