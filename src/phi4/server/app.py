"""The ASGI application: routes (each also under /api/v1), authentication, body limits, error mapping.

One request never hurts another: bodies are bounded in size and time and parsed strictly (server/body.py);
admission counts sequences (state.Admission); tokenizing, templating and grammar compilation run on the
engine client's worker threads; a request whose client goes away is aborted, streamed or not; every error
is an OpenAI error body, and a 500 is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi4.errors import Phi4Error
from phi4.server.body import BodyLimits, read_model
from phi4.server.chat import create_chat_completion
from phi4.server.completions import create_completion, sequences
from phi4.server.errors import APIError, as_api_error, error_response
from phi4.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponsesRequest, TokenizeRequest,
)
from phi4.server.responses import create_response
from phi4.server.state import Reservation, ServerState
from phi4.server.web import add_web_page

logger = logging.getLogger("phi4.server")
PREFIXES = ("/v1", "/api/v1")
OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/ui/")  # and "/", the chat page
T = TypeVar("T")


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


class AccessControl:
    """API-key check and request counting, as plain ASGI (so that streams and disconnects pass untouched)."""

    def __init__(self, app: ASGIApp, loading: LoadingState) -> None:
        self.app = app
        self.loading = loading

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.loading.state
        status = 500

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path: str = scope["path"]
        try:
            if state is not None and state.api_key is not None and not (path == "/" or path.startswith(OPEN_PATHS)):
                supplied = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(supplied, f"Bearer {state.api_key}".encode()):
                    error = APIError(401, "Incorrect API key provided.", type_="authentication_error",
                                     code="invalid_api_key")
                    await error_response(error)(scope, receive, counted_send)
                    return
            await self.app(scope, receive, counted_send)
        finally:
            if state is not None:
                state.metrics.count_request(status)
            if status >= 400:
                logger.info("%s %s -> %d", scope["method"], path, status)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client goes away first: then cancel it (which aborts its engine requests)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def _declare_bodies(app: FastAPI, models: dict[str, type[BaseModel]]) -> None:
    """OpenAPI: the request body schemas of the routes that parse their bodies themselves (for strict JSON
    and OpenAI-shaped errors), so that clients and schema-based fuzzers see what each accepts."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, definitions = models_json_schema([(m, "validation") for m in set(models.values())],
                                                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            for path, model in models.items():
                for prefix in ("", *PREFIXES):
                    operation = schema["paths"].get(prefix + path, {}).get("post")
                    if operation is not None:
                        operation["requestBody"] = {"required": True, "content": {"application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(loading: LoadingState, max_body_bytes: int = 8 << 20, body_timeout: float = 30.0) -> FastAPI:
    app = FastAPI(title="phi4", docs_url=None, redoc_url=None)
    app.state.loading = loading

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Phi4Error)
    async def typed_error(_: Request, exc: Phi4Error) -> JSONResponse:  # invalid requests, failed requests
        return error_response(as_api_error(exc))

    @app.exception_handler(Exception)
    async def any_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug: answered as a 500 in OpenAI's shape; uvicorn logs the traceback.
        return error_response(as_api_error(exc))

    def respond(result: dict[str, Any] | AsyncIterator[str] | None) -> Response:
        if result is None:
            return Response(status_code=499)  # the client went away: nobody reads this
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generation(request: Request, body_type: type[Any], count: Callable[[Any], int],
                         create: Callable[[ServerState, Any, Reservation], Awaitable[Any]]) -> Response:
        state = loading.get()
        body = await read_model(await request.body(), body_type)
        state.check_model(body.model)
        with state.admission.reserve(count(body)) as reservation:
            return respond(await until_disconnected(request, create(state, body, reservation)))

    async def chat_completions(request: Request) -> Response:
        return await generation(request, ChatCompletionRequest, lambda body: body.n, create_chat_completion)

    async def completions(request: Request) -> Response:
        return await generation(request, CompletionRequest, sequences, create_completion)

    async def responses(request: Request) -> Response:
        return await generation(request, ResponsesRequest, lambda body: 1, create_response)

    async def stored_response(response_id: str) -> dict[str, Any]:
        return loading.get().responses.get(response_id).body

    def model_card(state: ServerState) -> dict[str, Any]:
        return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "phi4",
                "max_model_len": state.max_model_len}

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(loading.get())]}

    async def model(model_id: str) -> dict[str, Any]:
        state = loading.get()
        state.check_model(model_id)
        return model_card(state)

    async def tokenizer_info() -> dict[str, Any]:
        """The tokenizer's facts, as vLLM serves them (lm-eval's remote tokenizer reads them)."""
        state = loading.get()
        tokenizer = state.tokenizer
        return {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": state.max_model_len,
                "vocab_size": state.engine.vocab_size, "chat_template": tokenizer.chat_template,
                "eos_token": tokenizer.special_tokens.get("eos_token"),
                "bos_token": tokenizer.special_tokens.get("bos_token"),
                "pad_token": tokenizer.special_tokens.get("pad_token"),
                "unk_token": tokenizer.special_tokens.get("unk_token")}

    async def tokenize(request: Request) -> dict[str, Any]:
        state = loading.get()
        body = await read_model(await request.body(), TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            from phi4.server.tools import render_messages

            tokens = await state.engine.tokenize(render_messages(body.messages, None))
        else:
            tokens = await state.engine.tokenize(body.prompt or "")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    async def detokenize(request: Request) -> dict[str, Any]:
        state = loading.get()
        body = await read_model(await request.body(), DetokenizeRequest)
        state.check_model(body.model)
        if any(not 0 <= t < len(state.tokenizer.token_bytes) for t in body.tokens):
            raise APIError(400, "token ids out of the vocabulary", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    for prefix in ("", *PREFIXES):
        if prefix:
            app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
            app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
            app.add_api_route(f"{prefix}/models", models, methods=["GET"])
            app.add_api_route(f"{prefix}/models/{{model_id:path}}", model, methods=["GET"])
            app.add_api_route(f"{prefix}/responses", responses, methods=["POST"])
            app.add_api_route(f"{prefix}/responses/{{response_id}}", stored_response, methods=["GET"])
        app.add_api_route(f"{prefix}/tokenize", tokenize, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize, methods=["POST"])
        app.add_api_route(f"{prefix}/tokenizer_info", tokenizer_info, methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        state = loading.get()
        if state.fleet is not None:  # replicas behind Ray Serve: each one's state; 503 when none answers
            report = state.fleet.health()
            return JSONResponse(report, status_code=200 if report["healthy_replicas"] else 503)
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> Response:
        state = loading.get()
        text = state.metrics.render() + (state.fleet.render() if state.fleet is not None else "")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    add_web_page(app, loading)
    _declare_bodies(app, {"/chat/completions": ChatCompletionRequest, "/completions": CompletionRequest,
                          "/responses": ResponsesRequest, "/tokenize": TokenizeRequest,
                          "/detokenize": DetokenizeRequest})
    app.add_middleware(AccessControl, loading=loading)  # type: ignore[arg-type]
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout=body_timeout)  # type: ignore[arg-type]
    return app
