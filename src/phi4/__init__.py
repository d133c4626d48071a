"""phi4: an OpenAI-compatible inference server for Microsoft's Phi-4 family."""

__version__ = "0.1.0"

from phi4.errors import (
    CheckpointError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    Phi4Error,
    RequestFailedError,
)
from phi4.llm import LLM
from phi4.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "Phi4Error",
    "CheckpointError",
    "ContextLengthExceededError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "RequestFailedError",
]
