"""What a chat session holds: the messages so far, the sampling settings, and an optional JSON schema or
tool list; and the request body they make (OpenAI's chat completions, streamed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The settings `/set` may change, with the type each value is read as.
SETTINGS: dict[str, type] = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int, "stop": list,
                             "frequency_penalty": float, "presence_penalty": float}


@dataclass
class Conversation:
    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI messages, the system one first
    settings: dict[str, Any] = field(default_factory=dict)
    schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    tools: list[dict[str, Any]] | None = None

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return str(self.messages[0]["content"])
        return None

    def set_system(self, text: str | None) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def clear(self) -> None:
        """Forget the exchanges; the system message stays."""
        system = self.system
        self.messages = []
        self.set_system(system)

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        body.update({name: value for name, value in self.settings.items() if value is not None})
        if self.schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": self.schema_name, "schema": self.schema, "strict": True}}
        if self.tools:
            body["tools"] = self.tools
            body["tool_choice"] = "auto"
        return body

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        messages = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(messages, dict):  # an export that wraps them: {"messages": [...]}
            messages = messages.get("messages")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool") for m in messages):
            raise ValueError(f"{path} does not hold a list of OpenAI messages (each with a role)")
        self.messages = messages
