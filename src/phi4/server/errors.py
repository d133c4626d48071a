"""The one place where errors become OpenAI error bodies: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from phi4.errors import ContextLengthExceededError, InvalidRequestError, RequestFailedError


logger = logging.getLogger("phi4.server")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance", type_="server_error",
                    code="server_shutting_down", headers={"Retry-After": "5"})


def as_api_error(exc: BaseException) -> APIError:
    """Every error a client may see, in OpenAI's shape; anything unexpected is a 500 (logged by the caller)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ValidationError):
        return validation_error(exc, None)
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), type_="server_error", code="engine_error")
    return APIError(500, "internal server error", type_="server_error")


def validation_error(exc: ValidationError, body: Any) -> APIError:
    """The first problem pydantic found, with `param` as the path into the request body."""
    first = exc.errors()[0]
    param = _body_path(first["loc"], body)
    message = first["msg"].removeprefix("Value error, ")
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def _body_path(loc: tuple[Any, ...], body: Any) -> str | None:
    # pydantic's locations also name the union member that failed ('temperature', 'float'); keep only the
    # parts that exist in the body (and always the first: a missing field is still the parameter to name).
    parts: list[str] = []
    node = body
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif index > 0:
            break
        else:
            node = None
        parts.append(str(part))
    return ".".join(parts) or None


def stream_error(exc: BaseException) -> str:
    """The SSE event that ends a stream which has begun and then failed (a 500 is logged with its traceback)."""
    error = as_api_error(exc)
    if error.status >= 500 and not isinstance(exc, APIError):
        logger.error("a stream failed: %s", error.message, exc_info=exc)
    return f"data: {json.dumps(error.body())}\n\n"
