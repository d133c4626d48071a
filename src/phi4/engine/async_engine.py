"""The engine loop in its own thread, behind a narrow asyncio interface: submit, stream outputs, abort.

The HTTP side never touches the engine directly. Submissions and aborts go through a queue that the loop
drains between steps, so an event-loop thread never waits for a model step; outputs come back to each
request's asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from phi4.engine.engine import LLMEngine
from phi4.engine.request import RequestOutput
from phi4.sampling_params import SamplingParams

logger = logging.getLogger("phi4.engine")


class EngineDeadError(RuntimeError):
    """The engine loop hit an unexpected error; the request was ended without a result."""


@dataclass
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._pending: deque[_Submission | str] = deque()  # new requests, or ids to abort
        self._streams: dict[str, _Submission] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="phi4-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + sum(isinstance(p, _Submission) for p in list(self._pending))

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; leaving the iteration early aborts the request at once."""
        self.engine.validate(prompt_token_ids, params)  # typed errors surface here, before queueing
        submission = _Submission(request_id, prompt_token_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._pending.append(submission)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await submission.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._pending.append(request_id)
                self._wakeup.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._apply_pending()
            if not engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug must not take the server down: fail the requests in flight
                logger.exception("engine step failed; ending %d requests", len(self._streams))
                self._fail_all(EngineDeadError(f"the engine failed: {exc!r}"))
                continue
            for output in outputs:
                submission = self._streams.get(output.request_id)
                if submission is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                submission.loop.call_soon_threadsafe(submission.queue.put_nowait, output)

    def _apply_pending(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, str):
                if self._streams.pop(item, None) is not None:
                    self.engine.abort_request(item)
                continue
            try:
                self.engine.add_request(item.prompt_token_ids, item.params, item.request_id)
            except Exception as exc:  # validated already; anything left is reported to that request alone
                item.loop.call_soon_threadsafe(item.queue.put_nowait, exc)
                continue
            self._streams[item.request_id] = item

    def _fail_all(self, error: BaseException) -> None:
        for request_id, submission in list(self._streams.items()):
            self.engine.abort_request(request_id)
            submission.loop.call_soon_threadsafe(submission.queue.put_nowait, error)
        self._streams.clear()
