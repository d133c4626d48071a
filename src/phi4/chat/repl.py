"""The terminal conversation: prompt_toolkit reads the input (history kept between runs, multi-line with
\"\"\" blocks or Esc-Enter), rich renders the streamed answer as markdown with highlighted code, and after
each answer one dim line gives its tokens, time to first token, speed and finish reason.

Ctrl-C while an answer streams closes its connection (the server aborts the request) and returns to the
prompt; at the prompt it clears the line; Ctrl-D or /exit leaves."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.syntax import Syntax

from phi4.chat.client import Answer, ChatClient, ChatError
from phi4.chat.commands import CommandError, run_command
from phi4.chat.conversation import Conversation

BLOCK = '"""'
REFRESH_PER_SECOND = 12  # of the streamed answer's markdown


def default_history() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "phi4" / "chat_history"


@dataclass(frozen=True)
class ReplOptions:
    history: Path
    plain: bool = False  # print the raw text as it streams (no markdown), e.g. when output is not a terminal


class Repl:
    def __init__(self, client: ChatClient, conversation: Conversation, options: ReplOptions,
                 console: Console | None = None) -> None:
        self.client = client
        self.conversation = conversation
        self.options = options
        self.console = console or Console(highlight=False)
        options.history.parent.mkdir(parents=True, exist_ok=True)
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _(event) -> None:  # noqa: ANN001 - prompt_toolkit's event
            event.current_buffer.insert_text("\n")

        self.session: PromptSession[str] = PromptSession(history=FileHistory(str(options.history)),
                                                         key_bindings=bindings)

    def read(self) -> str | None:
        """One message or command; None at end of input (Ctrl-D)."""
        try:
            line = self.session.prompt(">>> ")
        except KeyboardInterrupt:
            return ""
        except EOFError:
            return None
        if not line.lstrip().startswith(BLOCK):
            return line
        text = line.lstrip()[len(BLOCK):]
        while not text.rstrip().endswith(BLOCK) or text.strip() == "":
            try:
                text += "\n" + self.session.prompt("... ")
            except KeyboardInterrupt:
                return ""
            except EOFError:
                return None
        return text.rstrip()[: -len(BLOCK)].strip("\n")

    def run(self) -> int:
        self.console.print(f"[dim]phi4 chat with {self.conversation.model} — /help for commands, Ctrl-D to leave[/]")
        while True:
            text = self.read()
            if text is None:
                return 0
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                try:
                    outcome = run_command(self.conversation, text)
                except CommandError as exc:
                    self.console.print(f"[red]{exc}[/]")
                    continue
                if outcome.exit:
                    return 0
                if outcome.text:
                    self.console.print(outcome.text, style="dim", markup=False)
                continue
            self.answer(text)

    def answer(self, text: str) -> None:
        self.conversation.messages.append({"role": "user", "content": text})
        answer = Answer()
        interrupted = False
        try:
            self._stream(answer)
        except KeyboardInterrupt:
            interrupted = True
        except ChatError as exc:
            self.conversation.messages.pop()  # the question stays unasked; the user may send it again
            self.console.print(f"[red]error: {exc}[/]")
            return
        if answer.content or answer.tool_calls:
            self.conversation.messages.append(answer.message())
        else:
            self.conversation.messages.pop()
        self._show_tool_calls(answer)
        if self.conversation.schema is not None and not interrupted:
            self._show_parsed(answer)
        self.console.print(self._figures(answer, interrupted), style="dim", markup=False)

    def _stream(self, answer: Answer) -> None:
        pieces = self.client.stream(self.conversation.request(), answer)
        if self.options.plain:
            for piece in pieces:
                self.console.file.write(piece)
                self.console.file.flush()
            self.console.file.write("\n")
            return
        # The markdown is parsed again whole on each update: at most at the refresh rate, not per token.
        with Live(console=self.console, refresh_per_second=REFRESH_PER_SECOND, vertical_overflow="visible") as live:
            shown = 0.0
            try:
                for _ in pieces:
                    if time.monotonic() - shown >= 1 / REFRESH_PER_SECOND:
                        live.update(Markdown(answer.content))
                        shown = time.monotonic()
            finally:  # the whole answer, also when Ctrl-C ended it
                live.update(Markdown(answer.content))

    def _show_tool_calls(self, answer: Answer) -> None:
        for call in answer.tool_calls:
            try:
                arguments = json.dumps(json.loads(call["function"]["arguments"]), indent=2, ensure_ascii=False)
            except json.JSONDecodeError:
                arguments = call["function"]["arguments"]
            self.console.print(Panel(Syntax(arguments, "json", word_wrap=True),
                                     title=f"tool call: {call['function']['name']}", title_align="left"))

    def _show_parsed(self, answer: Answer) -> None:
        try:
            value = json.loads(answer.content)
        except json.JSONDecodeError as exc:
            self.console.print(f"[red]the answer is not JSON: {exc}[/]")
            return
        import jsonschema

        errors = sorted(jsonschema.validators.validator_for(self.conversation.schema)(self.conversation.schema)
                        .iter_errors(value), key=str)
        title = "valid JSON" if not errors else f"JSON, but not valid: {errors[0].message}"
        self.console.print(Panel(Syntax(json.dumps(value, indent=2, ensure_ascii=False), "json", word_wrap=True),
                                 title=title, title_align="left", border_style="green" if not errors else "red"))

    @staticmethod
    def _figures(answer: Answer, interrupted: bool) -> str:
        parts = [f"{answer.completion_tokens} tokens" if answer.completion_tokens is not None else "tokens: n/a"]
        if answer.time_to_first_token is not None:
            parts.append(f"first token {answer.time_to_first_token:.2f} s")
        if answer.tokens_per_second is not None:
            parts.append(f"{answer.tokens_per_second:.1f} tok/s")
        parts.append("stopped (Ctrl-C)" if interrupted else f"finish: {answer.finish_reason}")
        return " · ".join(parts)
