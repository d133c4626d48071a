"""One streamed chat completion over HTTP (Server-Sent Events), with the figures a user sees after it.

Closing the stream (Ctrl-C) closes the connection, which is how the server learns to abort the request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx


class ChatError(RuntimeError):
    """What the endpoint said was wrong (its OpenAI error message), or that it could not be reached."""


@dataclass
class Answer:
    pieces: list[str] = field(default_factory=list)  # the content as it streamed in (joined when read)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    ended_at: float | None = None

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.ended_at is None or not self.completion_tokens:
            return None
        decoding = self.ended_at - self.first_token_at
        return (self.completion_tokens - 1) / decoding if decoding > 0 and self.completion_tokens > 1 else None

    def message(self) -> dict[str, Any]:
        """The assistant message to keep in the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def add(self, choice: dict[str, Any]) -> str:
        """Take one streamed choice; return the text it added."""
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        if (text or delta.get("tool_calls")) and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if text:
            self.pieces.append(text)
        for call in delta.get("tool_calls") or []:
            while len(self.tool_calls) <= call.get("index", 0):
                self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            slot = self.tool_calls[call.get("index", 0)]
            slot["id"] = call.get("id") or slot["id"]
            function = call.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return text


def _error_text(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read())
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}"


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(600, connect=10))

    def first_model(self) -> str:
        try:
            response = self._http.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach {self.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise ChatError(f"{self.base_url}/models: {_error_text(response)}")
        return str(response.json()["data"][0]["id"])

    def stream(self, body: dict[str, Any], answer: Answer) -> Iterator[str]:
        """Yield the answer's text as it comes, filling `answer`; stopping early aborts the request."""
        try:
            with self._http.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ChatError(_error_text(response))
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):
                        raise ChatError(chunk["error"].get("message", "the server ended the answer with an error"))
                    if chunk.get("usage"):
                        answer.completion_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or []:
                        text = answer.add(choice)
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise ChatError(f"the connection to {self.base_url} failed: {exc}") from exc
        finally:
            answer.ended_at = time.monotonic()

    def close(self) -> None:
        self._http.close()
