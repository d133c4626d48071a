"""Reading an answer: reasoning apart from content, tool calls from text, the same streamed in any pieces
as read whole."""

from __future__ import annotations

import json
import random

import pytest

from phi4.server.answer import AnswerReader, read_whole
from phi4.tokenizer import ReasoningTags

TAGS = ReasoningTags()
NAMES = frozenset({"get_weather", "add"})
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def streamed(text: str, tags: ReasoningTags | None, names: frozenset[str] | None, thinking: bool,
             seed: int) -> AnswerReader:
    rng = random.Random(seed)
    reader = AnswerReader(tags, names, thinking)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    events = []
    for i, piece in enumerate(pieces):
        events += reader.feed(piece, final=i == len(pieces) - 1)
    assert "".join(e.text for e in events if e.kind == "reasoning") == reader.reasoning
    assert "".join(e.text for e in events if e.kind == "content") == reader.content
    for index, call in enumerate(reader.calls):
        assert "".join(e.text for e in events if e.kind == "arguments" and e.index == index) == call.arguments
    return reader


CASES = {
    "thinking then answer": ("<think>Let me see: 2 < 3.</think>\n\nYes, 2 < 3.", TAGS, None, False,
                             ("Let me see: 2 < 3.", "Yes, 2 < 3.", [])),
    "thinking opened by the prompt": ("It is </thin-ish.</think>The answer.", TAGS, None, True,
                                      ("It is </thin-ish.", "The answer.", [])),
    "a reasoning model that skips thinking": ("Plain answer.", TAGS, None, False, ("", "Plain answer.", [])),
    "not a reasoning model": ("<think>x</think>y", None, None, False, ("", "<think>x</think>y", [])),
    "calls only": (CALL + "\n" + CALL.replace("Oslo", "Rome"), None, NAMES, False,
                   ("", "", [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})])),
    "a preamble, then a call": ("Let me check.\n" + CALL, None, NAMES, False,
                                ("", "Let me check.\n", [("get_weather", {"city": "Oslo"})])),
    "a malformed call stays text": ("See:\n<tool_call>{not json}</tool_call>\nbye", None, NAMES, False,
                                    ("", "See:\n<tool_call>{not json}</tool_call>\nbye", [])),
    "an undeclared function stays text": ('x\n<tool_call>{"name": "rm", "arguments": {}}</tool_call>', None, NAMES,
                                          False, ("", 'x\n<tool_call>{"name": "rm", "arguments": {}}</tool_call>', [])),
    "thinking, then a call": ("<think>I need the weather.</think>\n" + CALL, TAGS, NAMES, False,
                              ("I need the weather.", "", [("get_weather", {"city": "Oslo"})])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_answer_reads_the_same_whole_or_streamed_in_any_pieces(name: str) -> None:
    text, tags, names, thinking, (reasoning, content, calls) = CASES[name]
    whole = read_whole(text, tags, names, thinking)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls
    for seed in range(5):
        reader = streamed(text, tags, names, thinking, seed)
        assert (reader.reasoning, reader.content, [c.arguments for c in reader.calls]) == (
            whole.reasoning, whole.content, [c.arguments for c in whole.calls])
