"""OpenAI Responses API models (pydantic v2): the request, the response object, and the events of its stream.

Only what this engine can honour is modelled: text in and out, function tools, structured output. Fields OpenAI
defines that would change the result here (built-in tools, background runs, reasoning) are refused, not ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from server.protocol import FunctionDefinition, Integer, JsonSchemaFormat, OpenAIModel

# OpenAI's bounds on metadata: at most 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Chat request fields that mean the same here, passed on as sent (vLLM's sampling fields, chat_template_kwargs).
CHAT_EXTRAS = frozenset(
    {
        "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "ignore_eos", "min_tokens", "logit_bias", "skip_special_tokens",
        "include_stop_str_in_output", "priority", "speculative_decoding", "chat_template_kwargs",
    }
)  # fmt: skip
# Identifiers OpenAI uses for abuse monitoring and cache routing: they do not change a response, so they are accepted.
_IDENTIFIERS = frozenset({"safety_identifier", "prompt_cache_key"})


def item_id(prefix: str) -> str:
    """An OpenAI-style object id: ``resp_...``, ``msg_...``, ``fc_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _form(value: Any) -> str:
    return "text" if isinstance(value, str) else "list"


# ---------------------------------------------------------------- input items
class ResponseInputText(OpenAIModel):
    """A text part of a message: the user's (input_text) or an earlier answer's (output_text)."""

    type: Literal["input_text", "output_text"]
    text: str


# A string or a list of parts. Unions are tagged by the form that was sent, so that an error is about that form.
TextContent = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ResponseInputText], Tag("list")], Discriminator(_form)
]


class ResponseInputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent


class ResponseFunctionCallInput(OpenAIModel):
    """A call the model made earlier, fed back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class ResponseFunctionCallOutputInput(OpenAIModel):
    """The result of a call, for the model to continue from."""

    type: Literal["function_call_output"]
    call_id: str
    output: TextContent


def _item_type(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[ResponseInputMessage, Tag("message")]
    | Annotated[ResponseFunctionCallInput, Tag("function_call")]
    | Annotated[ResponseFunctionCallOutputInput, Tag("function_call_output")],
    # A message may leave its type out, as in OpenAI's "easy" input messages.
    Discriminator(
        _item_type,
        custom_error_type="input_item_type",
        custom_error_message="input items are messages, function_call or function_call_output items",
    ),
]
# A string is one user message.
Input = Annotated[Annotated[str, Tag("text")] | Annotated[list[InputItem], Tag("list")], Discriminator(_form)]


# ---------------------------------------------------------------- tools, text format
class ResponseFunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape ({"type", "name", ...}, no "function" wrapper)."""

    type: Literal["function"] = "function"

    @model_validator(mode="before")
    @classmethod
    def _only_functions(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tools of type {value.get('type')!r} are not supported: only function tools")
        return value


class ResponseToolChoiceFunction(OpenAIModel):
    type: Literal["function"]
    name: str


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")]
    | Annotated[ResponseToolChoiceFunction, Tag("function")],
    Discriminator(lambda value: "mode" if isinstance(value, str) else "function"),
]


class ResponseTextFormat(JsonSchemaFormat):
    """``text.format``: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseTextFormat:
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise ValueError("a format of type json_schema needs a name and a schema")
        return self


class ResponseTextConfig(OpenAIModel):
    format: ResponseTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# ---------------------------------------------------------------- request
class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: Input
    instructions: str | None = None
    max_output_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: ResponseTextConfig | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY or len(text) > MAX_METADATA_VALUE:
                raise ValueError(f"keys may have {MAX_METADATA_KEY} characters, values {MAX_METADATA_VALUE}")
        return value

    def unsupported_field(self) -> str | None:
        """The first field set to something this server cannot do (the caller refuses it with 400), or None."""
        if self.background:
            return "background"
        if self.truncation == "auto":
            return "truncation"
        if self.include:
            return "include"
        if self.text is not None and self.text.verbosity is not None:
            return "text.verbosity"
        for name, value in (self.model_extra or {}).items():
            if value is not None and name not in CHAT_EXTRAS and name not in _IDENTIFIERS:
                return name
        return None

    def chat_extras(self) -> dict[str, Any]:
        """The chat fields (vLLM's sampling fields, chat_template_kwargs) the request carries, as sent."""
        return {name: value for name, value in (self.model_extra or {}).items() if name in CHAT_EXTRAS}


# ---------------------------------------------------------------- response
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    id: str = Field(default_factory=lambda: item_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[ResponseOutputText]


class ResponseFunctionCall(BaseModel):
    id: str = Field(default_factory=lambda: item_id("fc"))
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str  # a JSON object as text
    status: ItemStatus


OutputItem = Annotated[ResponseOutputMessage | ResponseFunctionCall, Field(discriminator="type")]


class ResponseIncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] | None = None


class ResponseInputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the prefix cache already held


class ResponseOutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails = Field(default_factory=ResponseOutputTokensDetails)
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None  # a response that fails is an error reply (or an error event), never a stored object
    incomplete_details: ResponseIncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float
    top_p: float
    text: dict[str, Any]  # the request's text config as sent, {"format": {"type": "text"}} by default
    tool_choice: ToolChoice
    tools: list[ResponseFunctionTool] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# ---------------------------------------------------------------- stream events
class ResponseLifecycleEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    sequence_number: int
    response: ResponseObject


class ResponseOutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class _ItemEvent(BaseModel):
    """What every event about one output item carries."""

    sequence_number: int
    item_id: str
    output_index: int


class _TextEvent(_ItemEvent):
    content_index: int
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ResponseContentPartEvent(_ItemEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    content_index: int
    part: ResponseOutputText


class ResponseTextDeltaEvent(_TextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class ResponseTextDoneEvent(_TextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ResponseArgumentsDeltaEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class ResponseArgumentsDoneEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    arguments: str


class ResponseErrorEvent(BaseModel):
    """A failure after the stream started, which can only be reported in-band."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None = None
    message: str
    param: str | None = None


STREAM_EVENTS: list[type[BaseModel]] = [
    ResponseLifecycleEvent,
    ResponseOutputItemEvent,
    ResponseContentPartEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseArgumentsDeltaEvent,
    ResponseArgumentsDoneEvent,
    ResponseErrorEvent,
]
