"""`phi4 serve`: load the model in the background, serve HTTP with uvicorn, stop gracefully on signals.

Shutdown: SIGINT/SIGTERM stop accepting connections and let requests in flight finish for the grace
period; then every request still open ends with an error (a stream: an error event, then `[DONE]`), so
that no client sees its stream cut without a word. Slow clients cannot hold sockets: headers must arrive
within `header_timeout` seconds of the connection (or of the last response), and each piece of a body
within `body_timeout` (else 408).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from phi4.config import EngineConfig
from phi4.engine.client import InProcessEngine
from phi4.engine.engine import LLMEngine
from phi4.errors import CannotListenError
from phi4.model.loader import resolve_checkpoint
from phi4.server.app import LoadingState, create_app
from phi4.server.errors import shutting_down
from phi4.server.state import ServerState

logger = logging.getLogger("phi4.server")


@dataclass(frozen=True)
class ServeOptions:
    model: str = "microsoft/phi-4"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "microsoft/phi-4"
    api_key: str | None = None
    max_queue: int = 1024
    max_stop_sequences: int = 16
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineConfig = EngineConfig()
    graceful_shutdown_seconds: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0


def load_state(options: ServeOptions) -> ServerState:
    engine = LLMEngine(resolve_checkpoint(options.model), options.engine, options.device, options.dtype)
    logger.info("loaded %s on %s (%s); max_model_len %d, %d KV blocks", options.model, engine.device, engine.dtype,
                engine.max_model_len, engine.block_manager.num_blocks)
    return ServerState(InProcessEngine(engine), options.served_model_name, options.api_key, options.max_queue,
                       options.max_stop_sequences)


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything else starts: a port that is taken fails at once with a
    clear reason. (uvicorn would bind only after the model had begun loading, then exit with the load still
    running, which ended in a C++ abort.) uvicorn listens on it; a fleet (`--replicas`) only checks, since
    HAProxy binds its own."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed server's port is free
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = (f" (another server, or the HAProxy of an earlier `phi4 serve --replicas` still running? "
                f"`ss -ltnp 'sport = :{port}'` shows which process holds it)" if exc.errno == errno.EADDRINUSE else "")
        raise CannotListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    return sock


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    class HeaderDeadlineProtocol(H11Protocol):
        """uvicorn waits for a request's headers for as long as a client cares to send them; this closes a
        connection whose request has not begun `seconds` after the connection (or the last response)."""

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._enforce_deadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._enforce_deadline)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _enforce_deadline(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


class GracefulServer(uvicorn.Server):
    """uvicorn's shutdown, plus: when the grace period is over, the requests still open end with an error."""

    def __init__(self, config: uvicorn.Config, loading: LoadingState, grace: float) -> None:
        super().__init__(config)
        self.loading = loading
        self.grace = grace

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets and self.started:  # uvicorn announces only an address it bound itself; scripts wait for this
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                    f"[{host}]" if ":" in host else host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        expiry = asyncio.get_running_loop().call_later(self.grace, self._end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            expiry.cancel()

    def _end_open_requests(self) -> None:
        state = self.loading.state
        if state is not None:
            logger.warning("the grace period is over: ending the requests still open")
            state.engine.cancel_all(shutting_down())


def build_server(options: ServeOptions, log_level: str = "info") -> tuple[GracefulServer, LoadingState]:
    """The uvicorn server and the model's background loading, ready to run (`phi4 serve`, `phi4 chat`)."""
    # uvicorn waits past the grace period only for the streams to send their error events.
    config = uvicorn.Config(None, host=options.host, port=options.port, log_level=log_level, access_log=False,
                            http=protocol_with_header_timeout(options.header_timeout),
                            timeout_graceful_shutdown=int(options.graceful_shutdown_seconds) + 5)

    def give_up(error: BaseException) -> None:
        logger.error("could not load %s: %s", options.model, error)
        server.should_exit = True  # a server that can never answer should not pretend to

    loading = LoadingState(lambda: load_state(options), on_failure=give_up)
    server = GracefulServer(config, loading, options.graceful_shutdown_seconds)
    config.app = create_app(loading, body_timeout=options.body_timeout)
    return server, loading


def serve(options: ServeOptions) -> int:
    """Serve until a signal; the exit status is 1 when the model could not be loaded. An address it cannot
    listen on raises CannotListenError before anything starts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listening = bind_listening_socket(options.host, options.port)
    server, loading = build_server(options)
    loading.start()
    try:
        server.run(sockets=[listening])
    finally:
        if loading.state is not None:
            loading.state.engine.shutdown()
    return 1 if loading.error is not None else 0
