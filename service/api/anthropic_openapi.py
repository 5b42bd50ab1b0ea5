"""The OpenAPI description of Anthropic's Messages API routes: documentation models mirroring what
anthropic_stream.py and messages.py build (extra fields forbidden, so the fuzzer notices an undocumented one), the
named-event stream, and Anthropic's error shape. openapi.py merges them into /openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from service.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from service.api.openapi_parts import error_responses, json_body, ref


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnthropicErrorDetail(_Doc):
    type: str
    message: str


class AnthropicError(_Doc):
    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None


class AnthropicUsage(_Doc):
    input_tokens: int  # prompt tokens not read from the prefix cache
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class TextBlock(_Doc):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Doc):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseBlock(_Doc):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn",
                     "model_context_window_exceeded"]


class AnthropicMessage(_Doc):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: AnthropicUsage


class MessageStartEvent(_Doc):
    type: Literal["message_start"]
    message: AnthropicMessage


class PingEvent(_Doc):
    type: Literal["ping"]


class ContentBlockStartEvent(_Doc):
    type: Literal["content_block_start"]
    index: int
    content_block: ThinkingBlock | TextBlock | ToolUseBlock


class TextDelta(_Doc):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(_Doc):
    type: Literal["thinking_delta"]
    thinking: str


class InputJsonDelta(_Doc):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDeltaEvent(_Doc):
    type: Literal["content_block_delta"]
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class ContentBlockStopEvent(_Doc):
    type: Literal["content_block_stop"]
    index: int


class MessageDelta(_Doc):
    stop_reason: StopReason
    stop_sequence: str | None


class MessageDeltaEvent(_Doc):
    type: Literal["message_delta"]
    delta: MessageDelta
    usage: AnthropicUsage


class MessageStopEvent(_Doc):
    type: Literal["message_stop"]


class MessageTokensCount(_Doc):
    input_tokens: int


class AnthropicModelInfo(_Doc):
    type: Literal["model"]
    id: str
    display_name: str
    created_at: str


class AnthropicModelList(_Doc):
    data: list[AnthropicModelInfo]
    first_id: str | None
    last_id: str | None
    has_more: bool


_EVENTS: list[type[BaseModel]] = [MessageStartEvent, PingEvent, ContentBlockStartEvent, ContentBlockDeltaEvent,
                                  ContentBlockStopEvent, MessageDeltaEvent, MessageStopEvent]
MODELS: list[type[BaseModel]] = [MessagesRequest, CountTokensRequest, AnthropicError, AnthropicMessage,
                                 MessageTokensCount, AnthropicModelInfo, AnthropicModelList, *_EVENTS]
_WHY = {400: "Invalid request.", 401: "Missing or wrong API key (`x-api-key` or `Authorization: Bearer`).",
        404: "Unknown model.", 413: "Request body over --max-request-body-bytes.",
        415: "Content-Type is not application/json.", 500: "A server bug or an engine failure.",
        503: "Queue full, draining, or the engine stopped; retry after Retry-After seconds (overloaded_error).",
        504: "The request ran past --request-timeout and was aborted."}


def _errors(*statuses: int) -> dict[str, Any]:
    return error_responses(AnthropicError, _WHY, statuses, " Anthropic's error shape.")


def _event_stream() -> dict[str, Any]:
    """One event is `event: TYPE` + `data: {json}` whose `type` is TYPE; the stream ends with `message_stop`, or
    with an `error` event."""
    names = [m.model_fields["type"].annotation.__args__[0] for m in _EVENTS] + ["error"]  # type: ignore[union-attr]
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"oneOf": [*(ref(m) for m in _EVENTS), ref(AnthropicError)]}}
    last = {"type": "object", "required": ["event"], "properties": {"event": {"enum": ["message_stop", "error"]}}}
    return {"itemSchema": {"type": "object", "required": ["event", "data"],
                           "properties": {"event": {"enum": names}, "data": data}},
            "schema": {"type": "array", "description": "`message_stop` or `error` once, as the last event",
                       "contains": last, "minContains": 1, "maxContains": 1}}


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    ok = {"description": "The message as JSON; with `stream: true` Anthropic's server-sent events (`event: TYPE` + "
                         "`data: {json}`): message_start, ping, content_block_start / _delta / _stop per block, "
                         "message_delta (stop_reason, usage), message_stop; or an `error` event.",
          "content": {"application/json": {"schema": ref(AnthropicMessage)}, "text/event-stream": _event_stream()}}
    return {
        ("/v1/messages", "post"): {
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(MessagesRequest)}}},
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 415, 500, 503, 504)}},
        ("/v1/messages/count_tokens", "post"): {
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(CountTokensRequest)}}},
            "responses": {"200": json_body(MessageTokensCount, "The prompt's tokens."),
                          **_errors(400, 401, 404, 413, 415)}},
    }
