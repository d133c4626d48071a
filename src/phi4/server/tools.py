"""Tool calling for Phi-4, which has no native tool format: a documented text format, enforced by a grammar.

In the prompt, the declared tools are described in a system-message section (`tools_system_prompt`). The
model calls a function by answering with one or more lines

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

and nothing else. An assistant message with `tool_calls` is rendered back in that form, and a `tool`
message as a user turn holding `<tool_response>{"tool_call_id": ..., "content": ...}</tool_response>`.
`tool_choice` becomes a Lark grammar with the functions' parameter schemas embedded (`%json`): `required`
gives one or more calls (exactly one without `parallel_tool_calls`), a named function exactly one call to
it, and `auto` either plain text (which cannot begin with `<`) or calls, held to valid ones once begun.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from phi4.errors import InvalidRequestError
from phi4.server.protocol import ChatMessage, NamedToolChoice, Tool
from phi4.structured.grammars import COMPACT_JSON
from phi4.structured.unique import strip_unique_items

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
ARGUMENTS_END = "}" + CALL_CLOSE


def call_prefix(name: str) -> str:
    return f'{CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": '


def tools_system_prompt(tools: list[Tool]) -> str:
    described = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                      "parameters": t.function.parameters or {"type": "object"}},
                                     ensure_ascii=False) for t in tools)
    return (
        "# Tools\nYou may call the functions below. To call one, answer only with lines of the form\n"
        f'{CALL_OPEN}{{"name": "<function name>", "arguments": <arguments as JSON>}}{CALL_CLOSE}\n'
        "one line per call. The functions, with JSON schemas of their arguments:\n" + described
    )


def render_messages(messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict[str, str]]:
    """OpenAI messages -> the roles and plain contents Phi-4's chat template knows."""
    rendered: list[dict[str, str]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        content = message.text()
        if message.role == "assistant" and message.tool_calls:
            calls = [f"{call_prefix(c.function.name)}{c.function.arguments}}}{CALL_CLOSE}" for c in message.tool_calls]
            content = "\n".join(([content] if content else []) + calls)
        if message.role == "tool":
            role = "user"
            payload = {"tool_call_id": message.tool_call_id, "content": content}
            content = f"<tool_response>{json.dumps(payload, ensure_ascii=False)}</tool_response>"
        rendered.append({"role": role, "content": content})
    if tools:
        section = tools_system_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{section}"}
        else:
            rendered.insert(0, {"role": "system", "content": section})
    return rendered


def _lark_literal(text: str) -> str:
    return json.dumps(text)


def tool_grammar(
    tools: list[Tool], choice: str | NamedToolChoice | None, parallel: bool | None
) -> str | None:
    """The Lark grammar for `tool_choice`; None when the output is free ("none")."""
    if choice == "none" or not tools:
        return None
    by_name = {t.function.name: t for t in tools}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in by_name:
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                      "tool_choice")
        chosen = [by_name[choice.function.name]]
    else:
        chosen = tools
    rules = []
    for index, tool in enumerate(chosen):
        # uniqueItems is not held inside a call's arguments: the grammar cannot, and the tracker follows only
        # a response format's JSON (README: how JSON Schema keywords are held)
        schema = strip_unique_items(dict(tool.function.parameters or {"type": "object"}))
        schema.setdefault("x-guidance", COMPACT_JSON)
        rules.append(f"call_{index}: {_lark_literal(call_prefix(tool.function.name))} args_{index} "
                     f"{_lark_literal(ARGUMENTS_END)}")
        rules.append(f"args_{index}: %json {json.dumps(schema)}")
    one_call = "call: " + " | ".join(f"call_{i}" for i in range(len(chosen)))
    single = isinstance(choice, NamedToolChoice) or parallel is False
    calls = "calls: call" if single else 'calls: call ("\\n" call)*'
    start = "start: calls | TEXT\nTEXT: /[^<][\\s\\S]*/" if choice in (None, "auto") else "start: calls"
    return "\n".join([start, calls, one_call, *rules])


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call_line(line: str, names: frozenset[str]) -> ParsedToolCall | None:
    """A line `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` naming a declared function, or None:
    a line that is not a valid call stays text."""
    line = line.strip()
    if not (line.startswith(CALL_OPEN) and line.endswith(CALL_CLOSE)):
        return None
    try:
        body = json.loads(line[len(CALL_OPEN) : -len(CALL_CLOSE)])
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("name") not in names or not isinstance(body.get("arguments"), dict):
        return None
    return ParsedToolCall(body["name"], json.dumps(body["arguments"], ensure_ascii=False))


@dataclass
class ToolCallStreamer:
    """Turns the growing text of a tool-calling answer into OpenAI's tool-call deltas: for each call a first
    fragment (index, id, type, name), then fragments of its arguments."""

    text: str = ""
    calls: list[ParsedToolCall] = field(default_factory=list)
    _call_start: int = 0  # where the current call's line begins
    _args_start: int | None = None
    _args_sent: int = 0

    def is_tool_call(self) -> bool | None:
        """True/False once the answer shows which it is; None while it could still be either."""
        if self.text.startswith(CALL_OPEN):
            return True
        if CALL_OPEN.startswith(self.text):
            return None
        return False

    def feed(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += piece
        deltas: list[dict[str, Any]] = []
        while True:
            if self._args_start is None:
                head = self.text[self._call_start :]
                if not head.startswith(CALL_OPEN) or '"arguments": ' not in head:
                    return deltas
                name = json.loads(head[len(CALL_OPEN) : head.index(', "arguments": ')] + "}")["name"]
                self.calls.append(ParsedToolCall(name, ""))
                self._args_start = self._call_start + head.index('"arguments": ') + len('"arguments": ')
                self._args_sent = self._args_start
                call = self.calls[-1]
                deltas.append({"index": len(self.calls) - 1, "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
            end = self.text.find(ARGUMENTS_END, self._args_start)
            limit = end if end >= 0 else (len(self.text) if final else len(self.text) - len(ARGUMENTS_END))
            if limit > self._args_sent:
                fragment = self.text[self._args_sent : limit]
                self.calls[-1].arguments += fragment
                self._args_sent = limit
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            if end < 0:
                return deltas
            self._call_start = end + len(ARGUMENTS_END) + 1  # past the newline between calls
            self._args_start = None
