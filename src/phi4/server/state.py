"""What every request handler needs: the engine client, the tokenizer, settings, admission and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from phi4 import __version__
from phi4.engine.client import EngineClient
from phi4.server.errors import APIError
from phi4.server.generation import ChoiceRun, ChoiceState

if TYPE_CHECKING:
    from phi4.server.responses import ResponseStore
from phi4.server.metrics import Metrics
from phi4.tokenizer import Tokenizer

logger = logging.getLogger("phi4.server")


class FleetReport(Protocol):
    """Replicas behind one ingress (phi4/cluster): their health for /health, their series for /metrics."""

    def health(self) -> dict[str, Any]: ...

    def render(self) -> str: ...


class Admission:
    """`--max-queue` counts sequences (prompts x n), not HTTP requests: those waiting in the engine and those
    still being prepared. A request larger than the whole queue is a 400; one that does not fit now, a 429.

    Check and reserve happen on the event loop between awaits, so concurrent requests cannot both take
    the last places; a reservation ends when its sequences reach the engine (which counts them from then on)
    or when the request fails first."""

    def __init__(self, max_queue: int, engine_waiting: Callable[[], int]) -> None:
        self.max_queue = max_queue
        self._engine_waiting = engine_waiting
        self.preparing = 0

    def reserve(self, sequences: int) -> Reservation:
        if sequences > self.max_queue:
            raise APIError(400, f"this request asks for {sequences} sequences (prompts x n), more than the "
                                f"server's whole queue ({self.max_queue})", param="n", code="request_too_large")
        if self._engine_waiting() + self.preparing + sequences > self.max_queue:
            raise APIError(429, f"the server's queue is full ({self.max_queue} sequences waiting); retry shortly",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.preparing += sequences
        return Reservation(self, sequences)


@dataclass
class Reservation:
    admission: Admission
    sequences: int

    def release(self) -> None:
        self.admission.preparing -= self.sequences
        self.sequences = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass
class ServerState:
    engine: EngineClient
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    max_stop_sequences: int = 16
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    admission: Admission = field(init=False)
    responses: ResponseStore = field(default_factory=lambda: _response_store())
    fleet: FleetReport | None = None  # behind Ray Serve: every replica's health and series (phi4/cluster)

    def __post_init__(self) -> None:
        stats = self.engine.stats
        self.admission = Admission(self.max_queue, lambda: stats().num_waiting)
        self.metrics = Metrics({
            "phi4_num_requests_waiting": ("Sequences waiting to be scheduled.", lambda: stats().num_waiting),
            "phi4_num_requests_running": ("Sequences in the running batch.", lambda: stats().num_running),
            "phi4_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.", lambda: stats().kv_cache_usage),
            "phi4_kv_cache_free_blocks": ("KV-cache blocks free (cached prefixes included).",
                                          lambda: stats().kv_free_blocks),
            "phi4_num_preemptions": ("Sequences preempted so far.", lambda: stats().num_preemptions),
            "phi4_prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache so far.",
                                             lambda: stats().prefix_hit_tokens),
        })

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def system_fingerprint(self) -> str:
        return f"phi4-{__version__}"

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.served_model_name}`.",
                           param="model", code="model_not_found")

    def finish_request(self, request_id: str, prompt_tokens: int, choices: list[ChoiceState], run: ChoiceRun) -> None:
        generated = sum(len(c.token_ids) for c in choices)
        self.metrics.count_tokens(prompt_tokens, generated)
        logger.info("%s prompt_tokens=%d completion_tokens=%d latency=%.3fs finish=%s", request_id, prompt_tokens,
                    generated, time.perf_counter() - run.started, ",".join(str(c.finish_reason) for c in choices))


def _response_store() -> ResponseStore:
    from phi4.server.responses import ResponseStore  # responses builds on chat, which needs this module

    return ResponseStore()
