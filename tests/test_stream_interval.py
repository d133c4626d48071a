"""An in-process engine's streams with an interval (what a fleet's replica asks for): the first output at once,
then whatever came in each interval merged into one, the last at once; the same tokens and text as a stream
without one. The engine thread merges them, so the event loop wakes once per delivery, not per step."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from phi4.engine.client import InProcessEngine, PreparedRequest, _Submission
from phi4.engine.engine import LLMEngine
from phi4.engine.request import RequestOutput
from phi4.model.loader import resolve_checkpoint
from phi4.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> Iterator[InProcessEngine]:
    client = InProcessEngine(LLMEngine(resolve_checkpoint("demo")))
    yield client
    client.shutdown()


def outputs_of(engine: InProcessEngine, interval: float) -> list[RequestOutput]:
    request = PreparedRequest([200, 300, 400, 500], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))

    async def collect() -> list[RequestOutput]:
        return [output async for output in engine.generate(f"r{interval}", request, interval)]

    return asyncio.run(collect())


def test_a_stream_with_an_interval_sends_the_first_output_at_once_and_merges_the_rest(engine: InProcessEngine) -> None:
    every_step = outputs_of(engine, 0.0)
    merged = outputs_of(engine, 3600.0)  # an interval no step reaches: the first, then the last with the rest
    assert [len(o.new_token_ids) for o in every_step] == [1] * 12
    assert [len(o.new_token_ids) for o in merged] == [1, 11]
    assert [t for o in merged for t in o.new_token_ids] == [t for o in every_step for t in o.new_token_ids]
    assert "".join(o.new_text for o in merged) == "".join(o.new_text for o in every_step)
    assert merged[-1].finished and merged[-1].finish_reason == "length" and merged[-1].num_output_tokens == 12


def output(token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", new_token_ids=[token], new_text=f"<{token}>", new_logprobs=[],
                         finished=finished, finish_reason="length" if finished else None, prompt_token_ids=[1],
                         num_output_tokens=token)


def test_held_outputs_are_delivered_once_their_interval_has_passed() -> None:
    request = PreparedRequest([1], SamplingParams())
    submission = _Submission("r", request, None, None, interval=0.05)  # type: ignore[arg-type] - no loop needed
    assert submission.take(output(1), now=10.0).new_token_ids == [1]  # the first at once
    assert submission.take(output(2), now=10.01) is None and submission.take(output(3), now=10.02) is None
    assert not submission.overdue(10.04)
    assert submission.overdue(10.05)  # a request that makes no output (waiting, preempted) still gets them
    merged = submission.release(10.05)
    assert (merged.new_token_ids, merged.new_text, merged.num_output_tokens) == ([2, 3], "<2><3>", 3)
    assert not submission.overdue(11.0)  # nothing held
    assert submission.take(output(4), now=10.06) is None
    assert submission.take(output(5), now=10.11).new_token_ids == [4, 5]  # the interval has passed
    last = submission.take(output(6, finished=True), now=10.12)  # the last at once
    assert last.finished and last.new_token_ids == [6]
