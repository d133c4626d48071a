"""What every request handler needs: the engine bridge, the tokenizer, settings and metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from phi4 import __version__
from phi4.engine.async_engine import AsyncEngine
from phi4.server.errors import APIError
from phi4.server.generation import ChoiceRun, ChoiceState
from phi4.server.metrics import Metrics
from phi4.tokenizer import Tokenizer

logger = logging.getLogger("phi4.server")


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        engine = self.engine
        self.metrics = Metrics({
            "phi4_num_requests_waiting": ("Sequences waiting to be scheduled.", lambda: engine.num_waiting),
            "phi4_num_requests_running": ("Sequences in the running batch.", lambda: engine.num_running),
            "phi4_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.",
                                          lambda: engine.engine.block_manager.usage),
            "phi4_kv_cache_free_blocks": ("KV-cache blocks free (cached prefixes included).",
                                          lambda: engine.engine.block_manager.num_free_blocks),
        })

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def system_fingerprint(self) -> str:
        return f"phi4-{__version__}"

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.served_model_name}`.",
                           param="model", code="model_not_found")

    def check_queue(self) -> None:
        if self.engine.num_waiting >= self.max_queue:
            raise APIError(429, f"the server's queue is full ({self.max_queue} waiting); retry shortly",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def finish_request(self, request_id: str, prompt_tokens: int, choices: list[ChoiceState], run: ChoiceRun) -> None:
        generated = sum(len(c.token_ids) for c in choices)
        self.metrics.count_tokens(prompt_tokens, generated)
        logger.info("%s prompt_tokens=%d completion_tokens=%d latency=%.3fs finish=%s", request_id, prompt_tokens,
                    generated, time.perf_counter() - run.started, ",".join(str(c.finish_reason) for c in choices))
