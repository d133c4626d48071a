"""The ASGI application: routes (each also under /api/v1), authentication, body limits, error mapping."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi4.server.chat import create_chat_completion, prompt_token_ids
from phi4.server.completions import create_completion
from phi4.server.errors import APIError, as_api_error, validation_error
from phi4.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from phi4.server.state import ServerState

logger = logging.getLogger("phi4.server")
PREFIXES = ("/v1", "/api/v1")
OPEN_PATHS = ("/health", "/metrics")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BodyLimit:
    """Refuse a request body over the bound before anything parses it (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from exc


class LoadingState:
    """The server answers (503) while the model loads in the background; then it serves."""

    def __init__(
        self, load: Callable[[], ServerState], on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        self._load = load
        self._on_failure = on_failure
        self.state: ServerState | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="phi4-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.state = self._load()
        except BaseException as exc:  # reported by /health and every request, and to the owner
            self.error = exc
            if self._on_failure is not None:
                self._on_failure(exc)

    def get(self) -> ServerState:
        if self.state is None:
            detail = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, detail, type_="server_error", code="model_not_ready", headers={"Retry-After": "5"})
        return self.state


def create_app(loading: LoadingState, max_body_bytes: int = 8 << 20) -> FastAPI:
    app = FastAPI(title="phi4", docs_url=None, redoc_url=None)
    app.state.loading = loading

    @app.middleware("http")
    async def authenticate_and_count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        state = loading.state
        try:
            if state is not None and state.api_key is not None and not request.url.path.startswith(OPEN_PATHS):
                supplied = request.headers.get("authorization", "")
                expected = f"Bearer {state.api_key}"
                if not hmac.compare_digest(supplied.encode(), expected.encode()):
                    raise APIError(401, "Incorrect API key provided.", type_="authentication_error",
                                   code="invalid_api_key")
            response = await call_next(request)
        except Exception as exc:
            response = error_response(as_api_error(exc))
        if state is not None:
            state.metrics.count_request(response.status_code)
        if response.status_code >= 400:
            logger.info("%s %s -> %d", request.method, request.url.path, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def any_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    async def respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generation(request: Request, body_type: type[BaseModel], create: Callable[..., Awaitable[Any]]) -> Response:
        state = loading.get()
        body = await parse_body(request, body_type)
        state.check_model(body.model)
        state.check_queue()
        return await respond(await create(state, body))

    async def chat_completions(request: Request) -> Response:
        return await generation(request, ChatCompletionRequest, create_chat_completion)

    async def completions(request: Request) -> Response:
        return await generation(request, CompletionRequest, create_completion)

    async def models() -> dict[str, Any]:
        state = loading.get()
        return {"object": "list", "data": [{
            "id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "phi4",
            "max_model_len": state.max_model_len,
        }]}

    async def tokenize(request: Request) -> dict[str, Any]:
        state = loading.get()
        body = await parse_body(request, TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            tokens = prompt_token_ids(state, ChatCompletionRequest(model=state.served_model_name,
                                                                  messages=body.messages))
        else:
            tokens = state.tokenizer.encode(body.prompt or "")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    async def detokenize(request: Request) -> dict[str, Any]:
        state = loading.get()
        body = await parse_body(request, DetokenizeRequest)
        state.check_model(body.model)
        if any(not 0 <= t < len(state.tokenizer.token_bytes) for t in body.tokens):
            raise APIError(400, "token ids out of the vocabulary", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    for prefix in ("", *PREFIXES):
        if prefix:
            app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
            app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
            app.add_api_route(f"{prefix}/models", models, methods=["GET"])
        app.add_api_route(f"{prefix}/tokenize", tokenize, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        loading.get()
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(loading.get().metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # type: ignore[arg-type]
    return app
