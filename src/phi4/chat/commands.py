"""The slash commands of `phi4 chat`: each changes the conversation or says something, and never talks to
the server. A mistake is one line saying what was expected."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4.chat.conversation import SETTINGS, Conversation

HELP = """\
/set NAME VALUE   temperature, top_p, max_tokens, seed, stop, frequency_penalty or presence_penalty
                  (VALUE "none" unsets it; stop takes a string or a JSON list of strings)
/system TEXT      the system message (/system alone removes it)
/schema FILE      answers constrained to the JSON schema in FILE, shown parsed (/schema off)
/tools FILE       the tools in FILE (a JSON list) offered to the model; its calls are shown (/tools off)
/show             the current settings
/clear            forget the conversation (the system message stays)
/save FILE        the conversation as OpenAI messages (JSON)
/load FILE        continue a saved conversation
/help             this list
/exit             leave (also /bye, Ctrl-D)
Multi-line input: start with \"\"\" and end with \"\"\", or press Esc then Enter for a new line.
Ctrl-C stops the answer being written; at the prompt it clears the line."""


class CommandError(ValueError):
    pass


@dataclass(frozen=True)
class Outcome:
    text: str = ""
    exit: bool = False


def _read_json(path_text: str) -> Any:  # noqa: ANN401 - whatever the file holds
    path = Path(path_text).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path} is not JSON: {exc}") from exc


def _value(name: str, text: str) -> Any:  # noqa: ANN401 - the setting's own type
    if text.lower() in ("none", "null", "off"):
        return None
    kind = SETTINGS[name]
    if kind is list:
        if text.startswith("["):
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CommandError(f"stop: not a JSON list ({exc})") from exc
            if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
                raise CommandError("stop: a JSON list of non-empty strings")
            return values
        return [_unescape(text)]
    try:
        return kind(text)
    except ValueError as exc:
        raise CommandError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from exc


def _unescape(text: str) -> str:
    """`\\n` typed as two characters means a newline, as in a JSON string."""
    try:
        return str(json.loads(f'"{text}"'))
    except json.JSONDecodeError:
        return text


def set_setting(conversation: Conversation, argument: str) -> Outcome:
    name, _, text = argument.strip().partition(" ")
    if name not in SETTINGS:
        raise CommandError(f"/set: one of {', '.join(SETTINGS)}")
    if not text.strip():
        raise CommandError(f"/set {name} VALUE")
    conversation.settings[name] = _value(name, text.strip())
    return Outcome(f"{name} = {json.dumps(conversation.settings[name])}")


def set_schema(conversation: Conversation, argument: str) -> Outcome:
    if argument.strip() in ("", "off", "none"):
        conversation.schema = None
        return Outcome("answers are free text again")
    schema = _read_json(argument.strip())
    if not isinstance(schema, dict):
        raise CommandError("a JSON schema is an object")
    try:
        import jsonschema

        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise CommandError(f"not a valid JSON schema: {exc.message}") from exc
    conversation.schema = schema
    conversation.schema_name = Path(argument.strip()).stem.replace(" ", "_")[:64] or "answer"
    return Outcome(f"answers follow the schema in {argument.strip()}")


def set_tools(conversation: Conversation, argument: str) -> Outcome:
    if argument.strip() in ("", "off", "none"):
        conversation.tools = None
        return Outcome("no tools")
    tools = _read_json(argument.strip())
    if not isinstance(tools, list) or not tools:
        raise CommandError("tools: a JSON list of functions")
    wrapped = [tool if isinstance(tool, dict) and tool.get("type") == "function" else {"type": "function",
                                                                                       "function": tool}
               for tool in tools]
    names = [tool["function"].get("name") if isinstance(tool.get("function"), dict) else None for tool in wrapped]
    if not all(isinstance(name, str) and name for name in names):
        raise CommandError("tools: every function needs a name")
    conversation.tools = wrapped
    return Outcome(f"tools: {', '.join(names)}")  # type: ignore[arg-type]


def show(conversation: Conversation) -> Outcome:
    lines = [f"model: {conversation.model}"]
    lines += [f"{name}: {json.dumps(conversation.settings.get(name))}" for name in SETTINGS]
    lines.append(f"system: {conversation.system!r}")
    lines.append(f"schema: {json.dumps(conversation.schema) if conversation.schema else 'none'}")
    tool_names = [t["function"]["name"] for t in conversation.tools or []]
    lines.append(f"tools: {', '.join(tool_names) or 'none'}")
    lines.append(f"messages: {len(conversation.messages)}")
    return Outcome("\n".join(lines))


def save(conversation: Conversation, argument: str) -> Outcome:
    path = Path(argument.strip()).expanduser()
    if not argument.strip():
        raise CommandError("/save FILE")
    try:
        conversation.save(path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from exc
    return Outcome(f"saved {len(conversation.messages)} messages to {path}")


def load(conversation: Conversation, argument: str) -> Outcome:
    path = Path(argument.strip()).expanduser()
    try:
        conversation.load(path)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return Outcome(f"loaded {len(conversation.messages)} messages from {path}")


def system(conversation: Conversation, argument: str) -> Outcome:
    conversation.set_system(argument.strip() or None)
    return Outcome("system message set" if argument.strip() else "no system message")


def clear(conversation: Conversation, _: str) -> Outcome:
    conversation.clear()
    return Outcome("conversation cleared")


COMMANDS: dict[str, Callable[[Conversation, str], Outcome]] = {
    "/set": set_setting, "/system": system, "/schema": set_schema, "/tools": set_tools,
    "/show": lambda c, _: show(c), "/clear": clear, "/save": save, "/load": load,
    "/help": lambda c, _: Outcome(HELP), "/?": lambda c, _: Outcome(HELP),
    "/exit": lambda c, _: Outcome(exit=True), "/bye": lambda c, _: Outcome(exit=True),
}


def run_command(conversation: Conversation, line: str) -> Outcome:
    name, _, argument = line.strip().partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        raise CommandError(f"unknown command {name}; /help lists them")
    return command(conversation, argument)
