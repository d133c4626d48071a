"""The ingress's EngineClient for a fleet: requests are prepared here (tokenizer, chat template, validation,
grammar compilation: the same RequestPreparer as in one process, so errors are the same 400s), then sent to
a replica through the deployment handle, streamed; the router picks the replica.

A replica that dies mid-stream ends only its own requests, with a clear error (the server turns it into an
error event and `[DONE]`); closing a stream cancels it on its replica."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from phi4.cluster.fleet import FleetView
from phi4.cluster.wire import WireRequest
from phi4.engine.client import PreparedRequest, PreparingClient, RequestOutput, RequestPreparer
from phi4.engine.engine import EngineStats, validate_request
from phi4.errors import RequestFailedError
from phi4.model.loader import resolve_checkpoint
from phi4.structured.service import GrammarService
from phi4.tokenizer import Tokenizer


class ReplicaLostError(RequestFailedError):
    """The replica serving a request stopped (its process or node died); Ray Serve starts another."""


class _FleetStream:
    def __init__(self, response: DeploymentResponseGenerator, owner: RayEngineClient) -> None:
        self._response = response
        self._owner = owner
        self._failure: BaseException | None = None
        owner.open_streams.add(self)

    def __aiter__(self) -> _FleetStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._failure is not None:
            raise self._failure
        try:
            return await self._response.__anext__()
        except StopAsyncIteration:
            self._owner.open_streams.discard(self)
            raise
        except (RayError, serve.exceptions.RayServeException) as exc:
            self._owner.open_streams.discard(self)
            if self._failure is not None:
                raise self._failure from exc
            raise ReplicaLostError(f"the replica serving this request stopped ({type(exc).__name__}); "
                                   "please retry") from exc

    def fail(self, error: BaseException) -> None:
        self._failure = error
        self.close()

    def close(self) -> None:
        self._owner.open_streams.discard(self)
        self._response.cancel()  # Ray Serve cancels the replica's generator: the engine aborts the request


class RayEngineClient(PreparingClient):
    def __init__(self, handle: DeploymentHandle, model: str, fleet: FleetView, info: dict[str, Any]) -> None:
        checkpoint = Path(resolve_checkpoint(model))
        self.tokenizer = Tokenizer(checkpoint)
        self.max_model_len = int(info["max_model_len"])
        self.vocab_size = int(info["vocab_size"])
        grammars = GrammarService(checkpoint / "tokenizer.json", self.vocab_size,
                                  frozenset(info["eos_token_ids"]), self.tokenizer.token_bytes)
        super().__init__(RequestPreparer(self.tokenizer, grammars, self._validate))
        self._handle = handle.options(stream=True)
        self.fleet = fleet
        self.open_streams: set[_FleetStream] = set()
        self._ids = 0
        self._instance = secrets.token_hex(4)

    def _validate(self, prompt: list[int], params: Any) -> None:  # noqa: ANN401 - SamplingParams
        validate_request(prompt, params, self.vocab_size, self.max_model_len)

    def generate(self, request_id: str, request: PreparedRequest) -> _FleetStream:
        response = self._handle.generate.remote(request_id, WireRequest.from_prepared(request))
        assert isinstance(response, DeploymentResponseGenerator)  # the handle streams
        return _FleetStream(response, self)

    def stats(self) -> EngineStats:
        return self.fleet.totals()

    def new_request_id(self, prefix: str) -> str:
        """Unique across ingresses too: a replica's report lists the ids it holds, and the router tells its own
        requests from another ingress's by them."""
        self._ids += 1
        return f"{prefix}-{self._instance}-{self._ids}"

    def cancel_all(self, error: BaseException) -> None:
        for stream in list(self.open_streams):
            stream.fail(error)

    def shutdown(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
