"""An EngineClient without a model, for testing the HTTP server alone (body handling, validation, shapes).

Preparing is real (the demo's tokenizer and chat template, validation, grammar compilation); generating is
scripted: each request gets up to `tokens_per_request` fixed tokens at once, then finishes with "length".
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from phi4.engine.client import EngineRequest, PreparedRequest, PromptInput, RequestPreparer
from phi4.engine.engine import EngineStats, validate_request
from phi4.engine.request import RequestOutput
from phi4.sampling_params import SamplingParams
from phi4.structured.service import GrammarService
from phi4.tokenizer import Tokenizer

SCRIPT = [9906, 11, 1917, 0]  # "Hello", ",", " world", "!"


class FakeStream:
    def __init__(self, outputs: list[RequestOutput]) -> None:
        self._outputs = iter(outputs)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> RequestOutput:
        await asyncio.sleep(0)
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._outputs = iter(())


class FakeEngine:
    def __init__(self, checkpoint: Path, max_model_len: int = 1024, tokens_per_request: int = 4) -> None:
        self.tokenizer = Tokenizer(checkpoint)
        self.max_model_len = max_model_len
        self.vocab_size = 100352
        self.tokens_per_request = tokens_per_request
        grammars = GrammarService(checkpoint / "tokenizer.json", self.vocab_size, frozenset({100265}),
                                  self.tokenizer.token_bytes)
        self._preparer = RequestPreparer(self.tokenizer, grammars, self._validate)
        self._ids = itertools.count()
        self.cancelled: list[BaseException] = []

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        validate_request(prompt, params, self.vocab_size, self.max_model_len)

    async def prepare(self, request: EngineRequest) -> PreparedRequest:
        return self._preparer.prepare(request)

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        return self._preparer.tokenize(prompt)

    def generate(self, request_id: str, request: PreparedRequest) -> FakeStream:
        count = min(self.tokens_per_request, request.params.max_tokens or self.tokens_per_request)
        outputs = []
        for i in range(count):
            token = SCRIPT[i % len(SCRIPT)]
            last = i == count - 1
            outputs.append(RequestOutput(request_id, [token], self.tokenizer.decode([token]), [], last,
                                         "length" if last else None, request.prompt_token_ids, i + 1))
        return FakeStream(outputs)

    def stats(self) -> EngineStats:
        return EngineStats()

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def cancel_all(self, error: BaseException) -> None:
        self.cancelled.append(error)

    def shutdown(self) -> None:
        pass
