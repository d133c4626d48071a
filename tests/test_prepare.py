"""Where a request is prepared: a short prompt on the event loop (handing it to a worker thread would cost more
than the work), a long one or one with a grammar to compile on a worker thread, so that the loop never stalls."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from phi4.engine.client import INLINE_PROMPT_CHARS, EngineRequest, PreparingClient, PromptInput, RequestPreparer
from phi4.sampling_params import SamplingParams
from phi4.structured.grammars import GrammarSpec
from phi4.structured.service import GrammarService
from phi4.tokenizer import Tokenizer

PARAMS = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module")
def client_and_threads(demo_dir: Path) -> tuple[PreparingClient, list[str]]:
    """A client whose validation notes the thread it runs on: prepare and tokenize both end there."""
    tokenizer = Tokenizer(demo_dir)
    grammars = GrammarService(demo_dir / "tokenizer.json", 100352, frozenset({100265}), tokenizer.token_bytes)
    threads: list[str] = []

    def validate(prompt: list[int], params: SamplingParams) -> None:
        threads.append(threading.current_thread().name)

    return PreparingClient(RequestPreparer(tokenizer, grammars, validate)), threads


def thread_preparing(client_and_threads: tuple[PreparingClient, list[str]], request: EngineRequest) -> str:
    client, threads = client_and_threads
    prepared = asyncio.run(client.prepare(request))
    assert prepared.prompt_token_ids  # it did prepare
    return threads.pop()


LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * (INLINE_PROMPT_CHARS // 20)


@pytest.mark.parametrize(("prompt", "on_loop"), [
    (list(range(100, 16_100)), True),  # token ids, however many: validation only
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ("Once upon a time", True),
    (LONG_TEXT, False),
    ([{"role": "user", "content": LONG_TEXT}], False),
    ([{"role": "user", "content": "hi"}] * (INLINE_PROMPT_CHARS // 32), False),  # many short messages
], ids=["token-ids", "short-chat", "short-text", "long-text", "long-chat", "many-messages"])
def test_short_prompts_are_prepared_on_the_loop_and_long_ones_on_a_worker(
        client_and_threads: tuple[PreparingClient, list[str]], prompt: PromptInput, on_loop: bool) -> None:
    thread = thread_preparing(client_and_threads, EngineRequest(prompt, PARAMS))
    assert (thread == "MainThread") == on_loop, thread
    assert on_loop or thread.startswith("phi4-prepare")


def test_a_grammar_is_compiled_on_a_worker_however_short_the_prompt(
        client_and_threads: tuple[PreparingClient, list[str]]) -> None:
    grammar = GrammarSpec("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}})
    assert thread_preparing(client_and_threads, EngineRequest([1, 2, 3], PARAMS, grammar)).startswith("phi4-prepare")
    checks = (GrammarSpec("json_object"),)
    assert thread_preparing(client_and_threads, EngineRequest([1, 2, 3], PARAMS, checks=checks)) \
        .startswith("phi4-prepare")


def test_tokenize_follows_the_same_rule(demo_dir: Path) -> None:
    tokenizer = Tokenizer(demo_dir)
    seen: list[str] = []

    class NotingPreparer(RequestPreparer):
        def tokenize(self, prompt: PromptInput) -> list[int]:
            seen.append(threading.current_thread().name)
            return super().tokenize(prompt)

    client = PreparingClient(NotingPreparer(tokenizer, None, lambda prompt, params: None))  # type: ignore[arg-type]
    assert asyncio.run(client.tokenize("short")) == tokenizer.encode("short")
    assert asyncio.run(client.tokenize(LONG_TEXT)) == tokenizer.encode(LONG_TEXT)
    assert seen[0] == "MainThread" and seen[1].startswith("phi4-prepare")
