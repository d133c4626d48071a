"""A live `phi4 serve --model demo` on 127.0.0.1 for the tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "test-key"
MODEL = "microsoft/phi-4"
MAX_MODEL_LEN = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, *extra_args: str, api_key: str | None = API_KEY, model: str = "demo") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "phi4.cli", "serve", "--model", model, "--port", str(self.port),
                "--max-model-len", str(MAX_MODEL_LEN), *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        self.log = open(Path(os.environ["PHI4_CACHE"]) / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited during start-up"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        """SIGTERM, and check that the server shut down cleanly rather than being killed."""
        self.process.terminate()
        code = self.process.wait(timeout=30)
        self.log.close()
        log = Path(self.log.name).read_text()
        # uvicorn re-raises the signal after its graceful shutdown, so the status is 0 or -SIGTERM.
        assert code in (0, -15) and "Application shutdown complete" in log, log[-2000:]

    def post(self, path: str, body: object, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))
