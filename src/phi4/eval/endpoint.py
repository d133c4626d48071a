"""Where answers come from: any OpenAI-compatible chat endpoint, or a `phi4 serve` started for the run."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import httpx


class ChatEndpoint(Protocol):
    async def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str: ...


class OpenAIChatEndpoint:
    """POST {base_url}/chat/completions, retrying what a busy server answers (429, 5xx, timeouts)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, retries: int = 4) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(1800, connect=30))
        self.model = model
        self.retries = retries

    async def resolve_model(self) -> str:
        if self.model is None:
            response = await self._client.get(f"{self.base_url}/models")
            response.raise_for_status()
            self.model = response.json()["data"][0]["id"]
        return self.model

    async def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
        body = {"model": await self.resolve_model(), "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens}
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.post(f"{self.base_url}/chat/completions", json=body)
                if response.status_code == 400 and "context_length_exceeded" in response.text:
                    return ""  # the prompt does not fit: an unanswered question, scored as wrong
                if response.status_code != 429 and response.status_code < 500:
                    response.raise_for_status()
                    return response.json()["choices"][0]["message"]["content"] or ""
            except (httpx.TransportError, httpx.TimeoutException):
                if attempt == self.retries:
                    raise
            await asyncio.sleep(min(2**attempt, 30))
        response.raise_for_status()
        return ""

    async def close(self) -> None:
        await self._client.aclose()


@contextmanager
def local_server(model: str, max_model_len: int | None = None) -> Iterator[str]:
    """Run `phi4 serve --model MODEL` on a free loopback port for the evaluation; yield its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "phi4.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"phi4 serve exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("phi4 serve did not become ready")
            time.sleep(0.3)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
