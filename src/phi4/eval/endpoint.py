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
from pathlib import Path
from typing import Any, Protocol

import httpx


class EndpointError(RuntimeError):
    """What makes every request fail (endpoint unreachable, key refused): the run stops with this one line."""


class RequestFailed(RuntimeError):
    """One request that still failed after the retries: recorded as an error for its sample."""


class ChatEndpoint(Protocol):
    async def complete(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
                       seed: int | None = None) -> str: ...


def _message(response: httpx.Response) -> str:
    """The error's own words: OpenAI's {"error": {"message"}} or the body's start."""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])[:300]
    except ValueError:
        pass
    return response.text[:300].replace("\n", " ")


class OpenAIChatEndpoint:
    """POST {base_url}/chat/completions, retrying what a busy server answers (429, 5xx, timeouts)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, retries: int = 4,
                 backoff_seconds: float = 1.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(1800, connect=30), transport=transport)
        self.model = model
        self.retries = retries
        self.backoff_seconds = backoff_seconds

    def _refused(self, response: httpx.Response) -> EndpointError:
        return EndpointError(f"{self.base_url} refused the API key ({response.status_code}: {_message(response)}); "
                             "pass --api-key or set OPENAI_API_KEY")

    async def check(self) -> str:
        """Reach the endpoint once before the run and learn the model's name: one clear message if it is down,
        refuses the key, or lists no model."""
        try:
            response = await self._client.get(f"{self.base_url}/models", timeout=30)
        except httpx.HTTPError as exc:
            raise EndpointError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc or 'no answer'}); is the "
                                "server running, and is --base-url right (it ends in /v1)?") from exc
        if response.status_code in (401, 403):
            raise self._refused(response)
        if self.model is None:
            try:
                response.raise_for_status()
                self.model = str(response.json()["data"][0]["id"])
            except (httpx.HTTPStatusError, ValueError, KeyError, IndexError, TypeError) as exc:
                raise EndpointError(f"{self.base_url}/models did not list a model ({response.status_code}: "
                                    f"{_message(response)}); pass --served-model") from exc
        return self.model

    async def complete(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
                       seed: int | None = None) -> str:
        body: dict[str, Any] = {"model": self.model or await self.check(), "messages": messages,
                                "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_seconds * 2 ** (attempt - 1), 30))
            try:
                response = await self._client.post(f"{self.base_url}/chat/completions", json=body)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc or 'no answer'}"
                continue
            if response.status_code in (401, 403):
                raise self._refused(response)
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"{response.status_code}: {_message(response)}"
                continue
            if response.status_code == 400 and "context_length_exceeded" in response.text:
                return ""  # as simple-evals: a prompt that does not fit is an unanswered question, scored wrong
            if response.status_code != 200:
                raise RequestFailed(f"{response.status_code}: {_message(response)}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise RequestFailed(f"an answer without choices[0].message.content: {response.text[:200]}") from exc
        raise RequestFailed(f"failed after {self.retries + 1} attempts; last: {problem}")

    async def close(self) -> None:
        await self._client.aclose()


@contextmanager
def local_server(model: str, log_path: Path, max_model_len: int | None = None) -> Iterator[str]:
    """Run `phi4 serve --model MODEL` on a free loopback port for the evaluation; yield its base URL.
    Its output goes to `log_path` (a pipe nobody reads would fill and stop the server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "phi4.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    log = log_path.open("ab")
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
                raise EndpointError(f"phi4 serve --model {model} exited ({process.returncode}); its log, "
                                    f"{log_path}, ends:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EndpointError(f"phi4 serve --model {model} was not ready within 600 s (log: {log_path})")
            time.sleep(0.3)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
