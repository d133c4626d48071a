"""EngineClient: all the HTTP server knows of the engine, and the in-process engine behind it.

The interface: fixed facts (tokenizer, `max_model_len`, vocabulary size), `prepare` (tokenize, apply the
chat template, validate, compile grammars: in a pool of worker threads, never on the event loop),
`generate` (submit now, then an async stream of outputs; closing it early aborts the request), `stats` (a
snapshot the engine thread publishes) and `cancel_all` (shutdown). An in-process engine, a Ray Serve
replica set or a fake for the server's tests all fit behind it.

The in-process engine runs the engine loop in its own thread. Submissions and aborts go through a queue
that the loop drains between steps, so the event loop never waits for a model step; outputs come back to
each request's asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, Union

from phi4.engine.engine import EngineStats, LLMEngine
from phi4.engine.request import RequestOutput, merge_outputs
from phi4.engine.sampling import TokenLogprob
from phi4.errors import RequestFailedError
from phi4.sampling_params import SamplingParams
from phi4.structured.grammars import GrammarSpec, after_reasoning
from phi4.structured.service import CompiledGrammar, GrammarService
from phi4.tokenizer import Tokenizer

logger = logging.getLogger("phi4.engine")
__all__ = ["EngineClient", "EngineRequest", "EngineStats", "InProcessEngine", "OutputStream", "PreparedRequest",
           "PreparingClient", "RequestOutput", "RequestPreparer", "TokenLogprob"]  # all the server needs
T = TypeVar("T")
Messages = list[dict[str, Any]]
PromptInput = Union[list[int], str, Messages]


@dataclass(frozen=True)
class EngineRequest:
    """A request as the server hands it over: the prompt (token ids, text, or chat messages for the
    checkpoint's template), sampling, the output's grammar, and grammars that must also compile (each
    tool's parameter schema, for an error that names it)."""

    prompt: PromptInput
    params: SamplingParams
    grammar: GrammarSpec | None = None
    checks: tuple[GrammarSpec, ...] = ()
    reasoning: bool = False  # a reasoning model's answer: `grammar` holds after its thinking


@dataclass(frozen=True)
class PreparedRequest:
    """Validated, tokenized and compiled: submitting it does no work on the event loop."""

    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None = None
    thinking: bool = False  # the prompt ends with the reasoning model's open tag: its answer begins thinking

    def with_seed(self, seed: int | None) -> PreparedRequest:
        return dataclasses.replace(self, params=dataclasses.replace(self.params, seed=seed))


class RequestPreparer:
    """What `prepare` does, on whichever thread calls it: tokenize (applying the chat template to messages),
    validate, and compile the grammars."""

    def __init__(self, tokenizer: Tokenizer, grammars: GrammarService,
                 validate: Callable[[list[int], SamplingParams], None]) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.validate = validate

    def tokenize(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        return list(prompt)  # type: ignore[arg-type]

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        prompt = self.tokenize(request.prompt)
        self.validate(prompt, request.params)
        for check in request.checks:
            self.grammars.compile(check)
        tags = self.tokenizer.reasoning_tags if request.reasoning else None
        thinking = tags is not None and self.tokenizer.decode(prompt[-8:]).rstrip().endswith(tags.open)
        compiled = None
        if request.grammar is not None:
            text = request.grammar.to_grammar()
            if tags is not None:
                text = after_reasoning(text, tags.open, tags.close, thinking, tags.special)
            compiled = self.grammars.compile(text, request.grammar.param)
        params = request.params
        if compiled is not None:
            params = dataclasses.replace(params, grammar=compiled.text)
        return PreparedRequest(prompt, params, compiled, thinking)


class OutputStream(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int

    async def prepare(self, request: EngineRequest) -> PreparedRequest: ...

    async def tokenize(self, prompt: PromptInput) -> list[int]: ...

    def generate(self, request_id: str, request: PreparedRequest) -> OutputStream: ...

    def stats(self) -> EngineStats: ...

    def new_request_id(self, prefix: str) -> str: ...

    def cancel_all(self, error: BaseException) -> None: ...

    def shutdown(self) -> None: ...


# Handing work to a worker thread and back costs about 115 us of CPU (Intel Xeon, Sapphire Rapids class); preparing
# token ids (validation only) costs about 1 us, a one-line chat 46 us, 2,000 characters of text 660 us. A prompt up to
# this many characters, with no grammar to compile, is prepared on the event loop: it stalls the loop no longer than
# the hand-off would cost (a fleet's ingress prepares every request the fleet serves).
INLINE_PROMPT_CHARS = 512
_MESSAGE_CHARS = 64  # what one message adds to the template's work, besides its content


def prompt_chars(prompt: PromptInput) -> int:
    """The characters there are to tokenize in a prompt (token ids: none)."""
    if isinstance(prompt, str):
        return len(prompt)
    if prompt and isinstance(prompt[0], dict):
        messages: Messages = prompt  # type: ignore[assignment]
        return sum(len(str(message.get("content") or "")) + _MESSAGE_CHARS for message in messages)
    return 0


def prepared_inline(request: EngineRequest) -> bool:
    return request.grammar is None and not request.checks and prompt_chars(request.prompt) <= INLINE_PROMPT_CHARS


class PreparingClient:
    """`prepare` and `tokenize` on a pool of worker threads, so that the event loop never stalls, except for
    prompts too short to be worth the hand-off (INLINE_PROMPT_CHARS): the part of an EngineClient that is the same
    in one process and in front of a fleet (phi4/cluster)."""

    def __init__(self, preparer: RequestPreparer, workers: int = 4) -> None:
        self._preparer = preparer
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="phi4-prepare")

    async def _off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._workers, function, *args)

    async def prepare(self, request: EngineRequest) -> PreparedRequest:
        if prepared_inline(request):
            return self._preparer.prepare(request)
        return await self._off_loop(self._preparer.prepare, request)

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        if prompt_chars(prompt) <= INLINE_PROMPT_CHARS:
            return self._preparer.tokenize(prompt)
        return await self._off_loop(self._preparer.tokenize, prompt)


@dataclass(eq=False)  # hashed by identity: the engine thread keeps a set of those holding outputs
class _Submission:
    request_id: str
    request: PreparedRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    interval: float = 0.0  # seconds: at most one (merged) output per interval, the first and the last at once
    held: list[RequestOutput] = field(default_factory=list)  # outputs not delivered yet (engine thread only)
    last_delivered: float | None = None

    def take(self, output: RequestOutput, now: float) -> RequestOutput | None:
        """What to deliver now that `output` came: nothing yet, or everything held since the last delivery."""
        self.held.append(output)
        due = self.last_delivered is None or now - self.last_delivered >= self.interval
        return self.release(now) if due or output.finished else None

    def overdue(self, now: float) -> bool:
        """Whether outputs it holds have waited their interval (its request made none since)."""
        return bool(self.held) and now - (self.last_delivered or 0.0) >= self.interval

    def release(self, now: float) -> RequestOutput:
        merged = merge_outputs(self.held)
        self.held, self.last_delivered = [], now
        return merged


@dataclass(frozen=True)
class _CancelAll:
    error: BaseException


class _Stream:
    """One request's outputs, in order; an output with an error raises it. Closing it early aborts."""

    def __init__(self, client: InProcessEngine, submission: _Submission) -> None:
        self._client = client
        self._submission = submission
        self._done = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._submission.queue.get()
        if isinstance(item, BaseException):
            self._done = True  # the engine has dropped the request already
            raise item
        if item.finished:
            self._done = True
            if item.error is not None:
                raise RequestFailedError(item.error)
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._client._enqueue(self._submission.request_id)


def _deliver(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)


class InProcessEngine(PreparingClient):
    """An LLMEngine in this process, its loop on a thread of its own."""

    def __init__(self, engine: LLMEngine, prepare_workers: int = 4) -> None:
        super().__init__(RequestPreparer(engine.tokenizer, engine.grammars, engine.validate), prepare_workers)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self._pending: deque[_Submission | str | _CancelAll] = deque()  # new requests, ids to abort, cancel
        self._streams: dict[str, _Submission] = {}
        self._holding: set[_Submission] = set()  # streams with outputs held for their interval
        self._stats = engine.stats()
        self._wakeup = threading.Event()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="phi4-engine", daemon=True)
        self._thread.start()

    @property
    def engine_thread_id(self) -> int | None:
        """The native id of the thread that runs the engine's steps."""
        return self._thread.native_id

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def generate(self, request_id: str, request: PreparedRequest, interval: float = 0.0) -> _Stream:
        """The request's outputs as the engine makes them; with an `interval` (seconds), whatever came in each
        interval merged into one, the first and the last at once. The engine thread merges them, so the event
        loop wakes once per delivery, not once per step."""
        submission = _Submission(request_id, request, asyncio.get_running_loop(), asyncio.Queue(), interval)
        self._enqueue(submission)
        return _Stream(self, submission)

    def stats(self) -> EngineStats:
        """The last snapshot, with submissions the engine has not taken yet counted as waiting."""
        waiting = sum(isinstance(p, _Submission) for p in list(self._pending))
        return dataclasses.replace(self._stats, num_waiting=self._stats.num_waiting + waiting)

    def cancel_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (e.g. at shutdown)."""
        self._enqueue(_CancelAll(error))

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _enqueue(self, item: _Submission | str | _CancelAll) -> None:
        self._pending.append(item)
        self._wakeup.set()

    # the engine thread

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # its name in top -H and /proc (Linux); Python names only its own object
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("phi4-engine")
        engine = self.engine
        while not self._stopping:
            self._apply_pending()
            self._stats = engine.stats()  # published once per step (the previous step's result included)
            if not engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a bug outside any one request: end them all, go on
                logger.exception("the engine loop failed; ending %d requests", len(self._streams))
                self._cancel_all(RequestFailedError(f"the engine failed: {exc!r}"))
                continue
            # One wake-up per event loop per step, not one per output: the loop has less to do and the
            # engine thread fewer system calls (it matters when both share two cores); none in a step where
            # every stream with an interval holds its output.
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
            now = time.monotonic()
            for output in outputs:
                submission = self._streams.get(output.request_id)
                if submission is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                due = submission.take(output, now)
                if submission.held:
                    self._holding.add(submission)
                else:
                    self._holding.discard(submission)
                if due is not None:
                    batches.setdefault(submission.loop, []).append((submission.queue, due))
            for submission in [s for s in self._holding if s.overdue(now)]:
                # a request that made no output this step (waiting, preempted) still gets what it has, in time
                self._holding.discard(submission)
                batches.setdefault(submission.loop, []).append((submission.queue, submission.release(now)))
            for loop, batch in batches.items():
                loop.call_soon_threadsafe(_deliver, batch)

    def _apply_pending(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, str):
                submission = self._streams.pop(item, None)
                if submission is not None:
                    self._holding.discard(submission)  # its client has gone: what it held goes nowhere
                    self.engine.abort_request(item)
            elif isinstance(item, _CancelAll):
                self._cancel_all(item.error)
            else:
                try:
                    request = item.request
                    self.engine.add_prepared(item.request_id, request.prompt_token_ids, request.params,
                                             request.grammar)
                except Exception as exc:  # noqa: BLE001 - validated already; anything left is its own
                    item.loop.call_soon_threadsafe(item.queue.put_nowait, exc)
                    continue
                self._streams[item.request_id] = item

    def _cancel_all(self, error: BaseException) -> None:
        now = time.monotonic()
        for request_id, submission in list(self._streams.items()):
            self.engine.abort_request(request_id)
            if submission.held:  # what it made before the error, then the error
                submission.loop.call_soon_threadsafe(submission.queue.put_nowait, submission.release(now))
            submission.loop.call_soon_threadsafe(submission.queue.put_nowait, error)
        self._streams.clear()
        self._holding.clear()
