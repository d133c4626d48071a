"""The one place where errors become OpenAI error bodies: {"error": {message, type, param, code}}."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from phi4.engine.async_engine import EngineDeadError
from phi4.errors import ContextLengthExceededError, InvalidRequestError


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


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ValidationError):
        return validation_error(exc, None)
    if isinstance(exc, EngineDeadError):
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
