"""The OpenAI request bodies phi4 accepts, as pydantic models (validation only; no behaviour here)."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from phi4.sampling_params import MAX_TOP_K

Number = Union[StrictInt, StrictFloat]
MAX_TOKENS = 2**31 - 1  # no context is longer; larger values are refused, not wrapped
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²" passes str.isdigit but is no token id


class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM does; known fields must have the right type (no "1" for 1).
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class FunctionDefinition(_Body):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class JsonSchemaFormat(_Body):
    name: StrictStr
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's extension: exactly one of these constrains the output."""

    choice: list[StrictStr] | None = None
    regex: StrictStr | None = None
    grammar: StrictStr | None = None  # Lark, as llguidance reads it
    json_: Union[dict[str, Any], StrictStr, None] = Field(default=None, alias="json")


class SamplingFields(_Body):
    """Parameters shared by chat and text completions."""

    model: StrictStr
    temperature: Number | None = Field(default=None, ge=0, le=2)  # below 1e-5: greedy
    top_p: Number | None = Field(default=None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)  # 0: prompt log-probabilities only
    stop: Union[StrictStr, list[StrictStr], None] = None  # as many as the server's --max-stop-sequences
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    n: StrictInt = Field(default=1, ge=1, le=128)
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Extensions, named as vLLM names them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    top_k: StrictInt | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=2)
    ignore_eos: StrictBool = False
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(token):
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool | None = None


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    suffix: StrictStr | None = None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


# The Responses API (POST /v1/responses), function tools only.


class ResponseContentPart(_Body):
    type: Literal["input_text", "output_text", "text", "reasoning_text", "summary_text", "refusal"]
    text: StrictStr = ""


class ResponseInputItem(_Body):
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Union[StrictStr, list[ResponseContentPart], None] = None
    call_id: StrictStr | None = None
    name: StrictStr | None = None
    arguments: StrictStr | None = None
    output: Union[StrictStr, list[ResponseContentPart], None] = None
    id: StrictStr | None = None
    status: StrictStr | None = None


class ResponseFunctionTool(_Body):
    type: StrictStr  # "function" is the only kind served; others are refused by name
    name: StrictStr | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ResponseToolChoiceFunction(_Body):
    type: Literal["function"]
    name: StrictStr


class ResponseTextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseTextConfig(_Body):
    format: ResponseTextFormat | None = None


class ResponsesRequest(_Body):
    model: StrictStr
    input: Union[StrictStr, list[ResponseInputItem]]
    instructions: StrictStr | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ResponseToolChoiceFunction, None] = None
    parallel_tool_calls: StrictBool | None = None
    text: ResponseTextConfig | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)  # an extension, as in vLLM
    stream: StrictBool = False
    previous_response_id: StrictStr | None = None
    store: StrictBool = True
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
