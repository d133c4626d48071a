"""What an answer's text means: reasoning, content and tool calls, read as it streams in.

One reader serves chat completions and the Responses API, streamed or whole (a whole answer is the same
reader fed once), so the two can never disagree:

- Reasoning models (a chat template with think tags, as phi-4-reasoning's) answer `<think>...</think>`
  then the answer; the thinking comes out apart. When the prompt already ends with the open tag, the answer
  begins inside it. A tail that could still grow into a tag is held back.
- With tools, an answer that begins with `<tool_call>` is calls, held to valid ones by the grammar, and
  their arguments stream as they come. An answer that begins with text is text, but a whole line in it
  that is a valid call to a declared function becomes a call too (a preamble stays content); a line that
  only starts like one is held back until it shows which it is.

The text read so far is kept as lists of pieces, joined when asked for: appending to a string attribute
copies all of it, once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phi4.server.tools import CALL_OPEN, ParsedToolCall, ToolCallStreamer, parse_call_line


@dataclass(frozen=True)
class ReasoningTags:
    open: str = "<think>"
    close: str = "</think>"


@dataclass(frozen=True)
class AnswerEvent:
    """kind: "reasoning" or "content" (text), "call" (a call begins: its index, id and name) or "arguments"
    (a fragment of call `index`'s arguments)."""

    kind: str
    text: str = ""
    index: int = 0
    call: ParsedToolCall | None = None


def _held_tail(text: str, tag: str) -> int:
    """How long a tail of `text` could be the beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


@dataclass
class AnswerReader:
    reasoning_tags: ReasoningTags | None = None
    tool_names: frozenset[str] | None = None  # None: no tools
    thinking: bool = False  # the prompt ended with the open tag: the answer begins inside it
    calls: list[ParsedToolCall] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)
    _content: list[str] = field(default_factory=list)
    _at_line_start: bool = True  # the content so far is empty or ends with a newline
    _answer: list[str] = field(default_factory=list)  # everything fed since the answer began (after thinking)
    _pending: str = ""  # text not yet assigned (a tag or a line still undecided)
    _phase: str = "start"  # start -> (thinking ->) answer
    _mode: str | None = None  # the answer's mode once known: "text" or "calls"
    _calls: ToolCallStreamer = field(default_factory=ToolCallStreamer)

    def __post_init__(self) -> None:
        if self.reasoning_tags is None:
            self._phase = "answer"
        elif self.thinking:
            self._phase = "thinking"

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def answer_text(self) -> str:
        """The answer as written (after any thinking): what stays text when calls were cut short."""
        return "".join(self._answer)

    def feed(self, piece: str, final: bool = False) -> list[AnswerEvent]:
        if self._phase == "answer":
            self._answer.append(piece)
        self._pending += piece
        events: list[AnswerEvent] = []
        if self._phase == "start":
            tag = self.reasoning_tags.open  # type: ignore[union-attr]
            stripped = self._pending.lstrip()
            if stripped.startswith(tag):
                self._pending, self._phase = stripped[len(tag) :], "thinking"
            elif tag.startswith(stripped) and not final:
                return events
            else:
                self._begin_answer()
        if self._phase == "thinking":
            close = self.reasoning_tags.close  # type: ignore[union-attr]
            end = self._pending.find(close)
            if end < 0:
                keep = 0 if final else _held_tail(self._pending, close)
                split = len(self._pending) - keep
                text, self._pending = self._pending[:split], self._pending[split:]
                if text:
                    self._reasoning.append(text)
                    events.append(AnswerEvent("reasoning", text))
                return events
            text, self._pending = self._pending[:end], self._pending[end + len(close) :]
            if text:
                self._reasoning.append(text)
                events.append(AnswerEvent("reasoning", text))
            self._phase = "after_thinking"
        if self._phase == "after_thinking":  # the blank lines between thinking and answer belong to neither
            self._pending = self._pending.lstrip()
            if not self._pending and not final:
                return events
            self._begin_answer()
        return events + self._read_answer(final)

    def _begin_answer(self) -> None:
        """The answer begins with what is still unassigned; later pieces are appended as they are fed."""
        self._phase = "answer"
        self._answer.append(self._pending)

    def _read_answer(self, final: bool) -> list[AnswerEvent]:
        if self.tool_names is None:
            return self._add_content(self._take(len(self._pending)))
        if self._mode is None:
            if self._pending.startswith(CALL_OPEN):
                self._mode = "calls"
            elif CALL_OPEN.startswith(self._pending) and not final:
                return []
            else:
                self._mode = "text"
        if self._mode == "calls":
            return self._from_call_deltas(self._calls.feed(self._take(len(self._pending)), final))
        return self._text_with_calls(final)

    def _text_with_calls(self, final: bool) -> list[AnswerEvent]:
        events: list[AnswerEvent] = []
        while self._pending:
            if self._at_line_start and (self._pending.startswith(CALL_OPEN) or CALL_OPEN.startswith(self._pending)):
                end = self._pending.find("\n")
                if end < 0 and not final:
                    return events  # a line that may be a call: wait for its end
                line = self._take(len(self._pending) if end < 0 else end + 1)
                call = parse_call_line(line, self.tool_names or frozenset())
                if call is None:
                    events += self._add_content(line)
                else:
                    self.calls.append(call)
                    events += [AnswerEvent("call", index=len(self.calls) - 1, call=call),
                               AnswerEvent("arguments", call.arguments, len(self.calls) - 1)]
                continue
            end = self._pending.find("\n")
            events += self._add_content(self._take(len(self._pending) if end < 0 else end + 1))
        return events

    def _from_call_deltas(self, deltas: list[dict]) -> list[AnswerEvent]:
        self.calls = self._calls.calls
        events = []
        for delta in deltas:
            index = delta["index"]
            if "id" in delta:
                events.append(AnswerEvent("call", index=index, call=self.calls[index]))
            elif delta["function"]["arguments"]:
                events.append(AnswerEvent("arguments", delta["function"]["arguments"], index))
        return events

    def _take(self, count: int) -> str:
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    def _add_content(self, text: str) -> list[AnswerEvent]:
        if not text:
            return []
        self._content.append(text)
        self._at_line_start = text.endswith("\n")
        return [AnswerEvent("content", text)]


def read_whole(text: str, reasoning_tags: ReasoningTags | None, tool_names: frozenset[str] | None,
               thinking: bool) -> AnswerReader:
    reader = AnswerReader(reasoning_tags, tool_names, thinking)
    reader.feed(text, final=True)
    return reader
