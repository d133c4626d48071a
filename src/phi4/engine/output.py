"""Output processing: each request's sampled tokens become text deltas and, in the end, a finish reason.

Per token: advance the grammar, decide whether the request stops (EOS, stop token, grammar complete,
max_tokens, the end of the context), detokenize (the EOS or stop token that ends a request is counted but
never shown), cut at a stop string, and hold back a tail that could still grow into one. It runs for one
request at a time, so that whatever goes wrong with one request's text or grammar ends that request alone.

Only the text not yet reported is kept: a stop string can only begin there (the reported text never ends
in a possible start of one), so the work per token does not grow with the length of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi4.engine.request import RequestOutput, Sequence
from phi4.engine.sampling import TokenLogprob
from phi4.structured.constraint import Constraint
from phi4.tokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    """What the output side keeps per request."""

    detokenizer: IncrementalDetokenizer
    constraint: Constraint | None = None
    held: str = ""  # text decoded but not reported yet: it may be the beginning of a stop string


class OutputProcessor:
    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def process(self, seq: Sequence, state: RequestState, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """`token` was just appended to `seq`: its text and whether the request is done."""
        if state.constraint is not None:
            state.constraint.consume(token)
        reason = self._stop_reason(seq, state, token)
        stops = seq.params.stop
        text = state.held
        if not (reason == "stop" and (token in seq.params.stop_token_ids or token in self.eos_token_ids)):
            text += state.detokenizer.push([token])
        if reason is not None:
            text += state.detokenizer.flush()
        if stops and (cut := _find_stop_string(text, stops)) >= 0:
            text, reason = text[:cut], "stop"
        visible = len(text) if reason is not None else len(text) - _stop_prefix_length(text, stops)
        state.held = text[visible:]
        return output(seq, [token], text[:visible], [logprob] if logprob is not None else [], reason)

    def _stop_reason(self, seq: Sequence, state: RequestState, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if state.constraint is not None and (state.constraint.finished or token in self.eos_token_ids):
            return "stop"  # the grammar is complete (EOS under a grammar always ends it)
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def output(seq: Sequence, new_tokens: list[int], new_text: str, new_logprobs: list[TokenLogprob],
           finish_reason: str | None, error: str | None = None) -> RequestOutput:
    """The output of one step; a request's first (with a token, or its only one) carries what the prefill
    found: the prompt log-probabilities and how much of the prompt came from the cache."""
    first = seq.num_output_tokens <= 1 and (new_tokens or finish_reason is not None)
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new_tokens,
        new_text=new_text,
        new_logprobs=new_logprobs,
        finished=finish_reason is not None,
        finish_reason=finish_reason,
        prompt_token_ids=seq.prompt_token_ids,
        num_output_tokens=seq.num_output_tokens,
        error=error,
        prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs is not None else None,
        num_cached_tokens=seq.num_cached_tokens or 0,
    )


def _find_stop_string(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest stop string begins in `text`, or -1."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found, default=-1)


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string: held back."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
