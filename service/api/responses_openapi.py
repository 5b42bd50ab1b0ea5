"""The Responses API in /openapi.json: documentation models of what responses.py and responses_output.py send (a
Response, its output items, each stream event), forbidding extra fields as openapi.py's models do, so the fuzz
run (tests/test_fuzz_openapi.py) notices anything undocumented.

The stream is described as OpenAPI 3.2 does: `itemSchema` is one event, `{event, data}`, whose data is one of the
event models; `schema` is the whole stream, which holds `response.created` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputTextPart(_Doc):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]


class ReasoningTextPart(_Doc):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Doc):
    id: str
    type: Literal["reasoning"]
    summary: list[dict[str, Any]]
    content: list[ReasoningTextPart]


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(_Doc):
    id: str
    type: Literal["message"]
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputTextPart]


class FunctionCallItem(_Doc):
    id: str
    type: Literal["function_call"]
    status: ItemStatus
    arguments: str
    call_id: str
    name: str


OutputItem = ReasoningItem | MessageItem | FunctionCallItem


class ResponseUsageInputDetails(_Doc):
    cached_tokens: int
    cache_write_tokens: int


class ResponseUsageOutputDetails(_Doc):
    reasoning_tokens: int


class ResponseUsage(_Doc):
    input_tokens: int
    input_tokens_details: ResponseUsageInputDetails
    output_tokens: int
    output_tokens_details: ResponseUsageOutputDetails
    total_tokens: int


class ResponseErrorInfo(_Doc):
    code: str
    message: str


class IncompleteDetails(_Doc):
    reason: Literal["max_output_tokens"]


class ReasoningEcho(_Doc):
    effort: str | None
    summary: None


class TextEcho(_Doc):
    format: dict[str, Any]


class ResponseObject(_Doc):
    id: str
    object: Literal["response"]
    created_at: int
    model: str
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: ResponseErrorInfo | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningEcho
    store: bool
    temperature: float | None
    top_p: float | None
    text: TextEcho
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"]
    user: str | None
    background: Literal[False]
    usage: ResponseUsage | None


class ResponseDeleted(_Doc):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class _Event(_Doc):
    sequence_number: int


class ResponseCreatedEvent(_Event):
    type: Literal["response.created"]
    response: ResponseObject


class ResponseInProgressEvent(_Event):
    type: Literal["response.in_progress"]
    response: ResponseObject


class ResponseFinalEvent(_Event):
    type: Literal["response.completed", "response.incomplete", "response.failed"]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    output_index: int
    item_id: str
    content_index: int
    part: OutputTextPart | ReasoningTextPart


class OutputTextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"]
    output_index: int
    item_id: str
    content_index: int
    delta: str
    logprobs: list[Any]


class OutputTextDoneEvent(_Event):
    type: Literal["response.output_text.done"]
    output_index: int
    item_id: str
    content_index: int
    text: str
    logprobs: list[Any]


class ReasoningTextDeltaEvent(_Event):
    type: Literal["response.reasoning_text.delta"]
    output_index: int
    item_id: str
    content_index: int
    delta: str


class ReasoningTextDoneEvent(_Event):
    type: Literal["response.reasoning_text.done"]
    output_index: int
    item_id: str
    content_index: int
    text: str


class FunctionCallArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"]
    output_index: int
    item_id: str
    delta: str


class FunctionCallArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"]
    output_index: int
    item_id: str
    name: str
    arguments: str


class ResponseErrorEvent(_Event):
    type: Literal["error"]
    code: str | None
    message: str
    param: str | None


EVENTS: list[type[BaseModel]] = [
    ResponseCreatedEvent, ResponseInProgressEvent, ResponseFinalEvent, OutputItemEvent, ContentPartEvent,
    OutputTextDeltaEvent, OutputTextDoneEvent, ReasoningTextDeltaEvent, ReasoningTextDoneEvent,
    FunctionCallArgumentsDeltaEvent, FunctionCallArgumentsDoneEvent, ResponseErrorEvent]
MODELS: list[type[BaseModel]] = [ResponseObject, ResponseDeleted, *EVENTS]


def typed_event_stream(ref: Callable[[type[BaseModel]], dict[str, str]]) -> dict[str, Any]:
    """`text/event-stream` of typed events: `event: <type>` and `data: <one of EVENTS>`, no `[DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"oneOf": [ref(m) for m in EVENTS]}}
    created = {"type": "object", "required": ["event"], "properties": {"event": {"const": "response.created"}}}
    return {"itemSchema": {"type": "object", "required": ["event", "data"],
                           "properties": {"event": {"type": "string"}, "data": data}},
            "schema": {"type": "array", "description": "`response.created` first, once; a final event last",
                       "contains": created, "minContains": 1, "maxContains": 1}}
