"""Typed errors. The server maps each to an OpenAI error body in exactly one place."""

from __future__ import annotations


class Phi4Error(Exception):
    """Base of every error phi4 raises on purpose."""


class CheckpointError(Phi4Error):
    """A checkpoint directory is missing a file, has a malformed one, or describes another model."""


class ModelNotFoundError(Phi4Error):
    """A model name resolves to neither the demo, a local directory, nor a reachable Hub repository."""


class CannotListenError(Phi4Error, OSError):
    """A server cannot listen where it was asked to: the port is taken, the host is not this machine's, or the
    port needs privileges."""


class InvalidRequestError(Phi4Error, ValueError):
    """A request's parameters are out of range or inconsistent; `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus what it asks to generate) does not fit in the model's context."""

    def __init__(self, num_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
        if max_tokens is None:
            message = (f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                       f"{num_tokens} tokens.")
        else:
            message = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{num_tokens + max_tokens} tokens ({num_tokens} in the prompt, {max_tokens} for the "
                       "completion). Please reduce the prompt or the completion length.")
        super().__init__(message, param="messages")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class RequestFailedError(Phi4Error, RuntimeError):
    """The engine could not finish this request (its sampling, grammar or step failed); the others go on."""
