"""`phi4 chat --model ...`: the server, in this process, on a loopback port of its own, for the session.

The same server as `phi4 serve` (so Ctrl-C reaches it as a client disconnect, exactly as for a remote one),
run by uvicorn in a thread; its log goes to a file, not to the conversation."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from phi4.server.serve import ServeOptions, bind_listening_socket, build_server


class LocalServer:
    def __init__(self, options: ServeOptions, log_path: Path) -> None:
        self._socket = bind_listening_socket("127.0.0.1", 0)
        port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server, self.loading = build_server(options)  # (uvicorn configures its loggers here)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("phi4", "uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers = [handler]
            logger.setLevel(logging.INFO)
            logger.propagate = False
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="phi4-chat-server", daemon=True)

    def start(self, timeout: float = 600.0) -> None:
        """Serve, and wait until the model answers (or failed to load)."""
        self.loading.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        self.loading.wait(timeout)
        if self.loading.error is not None:
            raise RuntimeError(f"could not load the model: {self.loading.error}")
        while not (self.loading.state is not None and self.server.started):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model was not ready within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        if self.loading.state is not None:
            self.loading.state.engine.shutdown()
