"""`phi4 serve`: load the model in the background, serve HTTP with uvicorn, stop gracefully on signals."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import uvicorn

from phi4.config import EngineConfig
from phi4.engine.async_engine import AsyncEngine
from phi4.engine.engine import LLMEngine
from phi4.model.loader import resolve_checkpoint
from phi4.server.app import LoadingState, create_app
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
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineConfig = EngineConfig()
    graceful_shutdown_seconds: int = 30


def load_state(options: ServeOptions) -> ServerState:
    engine = LLMEngine(resolve_checkpoint(options.model), options.engine, options.device, options.dtype)
    logger.info("loaded %s on %s (%s); max_model_len %d, %d KV blocks", options.model, engine.device, engine.dtype,
                engine.max_model_len, engine.block_manager.num_blocks)
    return ServerState(AsyncEngine(engine), options.served_model_name, options.api_key, options.max_queue)


def serve(options: ServeOptions) -> int:
    """Serve until a signal; the exit status is 1 when the model could not be loaded."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(None, host=options.host, port=options.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=options.graceful_shutdown_seconds)
    server = uvicorn.Server(config)

    def give_up(error: BaseException) -> None:
        logger.error("could not load %s: %s", options.model, error)
        server.should_exit = True  # a server that can never answer should not pretend to

    loading = LoadingState(lambda: load_state(options), on_failure=give_up)
    config.app = create_app(loading)
    loading.start()
    try:
        # uvicorn stops accepting on SIGINT/SIGTERM and lets requests in flight finish (up to the timeout).
        server.run()
    finally:
        if loading.state is not None:
            loading.state.engine.shutdown()
    return 1 if loading.error is not None else 0
