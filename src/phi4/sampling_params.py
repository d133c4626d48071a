"""What a request asks of generation."""

from __future__ import annotations

from dataclasses import dataclass, field

from phi4.errors import InvalidRequestError


MAX_TOP_K = 2**31 - 1  # any value from the vocabulary size up keeps every token
# Below this a temperature divides logits into infinities: it is greedy, as in vLLM.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request.

    temperature 0 (or below MIN_TEMPERATURE) is greedy (argmax, ties to the lowest id). `max_tokens=None` generates until a stop
    condition or the end of the context. `seed=None` draws a fresh seed for the request.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: never part of the returned text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    # None: none; k: each prompt token's log-probability given the tokens before it, and the k most likely
    # there (computed in the prefill; the first token has none). Such a request skips the prefix cache.
    prompt_logprobs: int | None = None
    grammar: str | None = None  # an llguidance grammar (phi4.structured.grammars) every token must follow
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"top_k must be 0 (off) or in [1, {MAX_TOP_K}], got {self.top_k}", "top_k")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must not be negative, got {self.max_tokens}", "max_tokens")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise InvalidRequestError("max_tokens 0 is only for prompt log-probabilities", "max_tokens")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}", "repetition_penalty"
            )
        for token, bias in self.logit_bias.items():
            _check_range("logit_bias", bias, -100.0, 100.0)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {self.logprobs}", "top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
                                      "prompt_logprobs")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(t): float(b) for t, b in self.logit_bias.items()})

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low:g}, {high:g}], got {value}", name)
