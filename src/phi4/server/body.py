"""Request bodies: read within a size and a time limit, parsed as strict JSON into a pydantic model.

Every way a body can be wrong is a 4xx that says what is wrong, never a 500: over the size limit, with or
without Content-Length (413); a client that stops sending (408); invalid JSON, NaN or Infinity, integers
longer than Python parses, nesting deeper than MAX_DEPTH, strings that are not Unicode text (lone
surrogates); a value of the wrong type or out of range (400, with `param` naming it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi4.server.errors import APIError, error_response, validation_error

MAX_DEPTH = 64
LARGE_BODY = 256 << 10  # parsed on a worker thread above this size, so the event loop never stalls
Model = TypeVar("Model", bound=BaseModel)


class _BodyRefused(APIError):
    """Raised by the limited receive: the app's APIError handler answers it, or else BodyLimits does."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status, error.message, error.type, error.param, error.code, error.headers)


class BodyLimits:
    """Refuse a body over `max_bytes` (declared or streamed) with 413, and one that stops arriving for
    `timeout` seconds with 408, before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

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
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body: waiting for a disconnect, for as long as the response takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise _BodyRefused(APIError(408, f"the request body did not arrive within {self.timeout:g} s",
                                            code="request_timeout")) from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyRefused(too_large)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyRefused as refused:
            if not started:
                await error_response(refused)(scope, receive, send)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from exc
    except ValueError as exc:  # bad JSON, bad UTF-8, NaN/Infinity, integers beyond the digit limit
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    _check_values(data)
    return data


def _check_values(data: Any) -> None:
    """Depth within MAX_DEPTH, and every string (keys too) encodable as UTF-8: no lone surrogates. Numbers, booleans
    and null need no check and are not put on the stack (a prompt of token ids is most of a body's values)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                _check_text(key)
                if isinstance(value, _CHECKED):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node if isinstance(value, _CHECKED))


_CHECKED = (str, dict, list)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"the request body holds a string that is not valid Unicode text ({exc.reason} at "
                            f"position {exc.start})", code="invalid_json") from exc


def parse_model(raw: bytes, model: type[Model]) -> Model:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from exc


async def read_model(raw: bytes, model: type[Model]) -> Model:
    if len(raw) > LARGE_BODY:
        return await asyncio.to_thread(parse_model, raw, model)
    return parse_model(raw, model)
