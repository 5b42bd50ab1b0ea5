"""The OpenAPI document at /openapi.json: request bodies, every response status, and the SSE streams.

Routes read their bodies themselves (see body.py), so FastAPI cannot see them; this module describes them from
the same pydantic request models that validate them, and the responses from documentation models that mirror
what chat.py/completions.py/routes.py build. Response models forbid extra fields, so a fuzzer that checks
responses against this document (tests/test_fuzz_openapi.py) notices any field that is not documented.

A streamed response (`"stream": true`) is `text/event-stream`, described as OpenAPI 3.2 does: `itemSchema` is
one event (its `data` is the literal `[DONE]` or JSON: a chunk or an error event), `schema` the whole stream
(`[DONE]` exactly once).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from service.api import anthropic_openapi
from service.api.auth import is_protected
from service.api.openapi_parts import REF, error_responses, json_body, ref
from service.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from service.api.responses_openapi import MODELS as RESPONSES_MODELS
from service.api.responses_openapi import ResponseDeleted, ResponseObject, typed_event_stream
from service.api.responses_protocol import ResponsesRequest

FinishReason = Literal["stop", "length", "abort", "error"]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Doc):
    error: ErrorDetail


class PromptTokensDetails(_Doc):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    content: list[TokenLogprobEntry] | None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Doc):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Doc):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class Completion(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Doc):
    prompt: str


class ProbeStatus(_Doc):
    status: str
    reason: str | None = None


class ServerInfo(_Doc):
    name: str
    model: str
    uptime_s: int


_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest,
                                  ErrorResponse, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk,
                                  ModelList, ModelCard, TokenizeResponse, DetokenizeResponse, ProbeStatus,
                                  ServerInfo, ResponsesRequest, *RESPONSES_MODELS, *anthropic_openapi.MODELS]

_WHY = {400: "Invalid request (OpenAI error shape).", 401: "Missing or wrong API key.",
        404: "Unknown model.", 413: "Request body over --max-request-body-bytes.",
        415: "Content-Type is not application/json.", 500: "A server bug or an engine failure.",
        503: "Queue full, draining, or the engine stopped; retry after Retry-After seconds.",
        504: "The request ran past --request-timeout and was aborted."}

def _models(openai: type[BaseModel], anthropic: type[BaseModel], description: str) -> dict[str, Any]:
    """OpenAI's shape, or Anthropic's for a request with an `anthropic-version` header (the anthropic SDKs')."""
    return {"description": description + " Anthropic's shape when the request has an `anthropic-version` header.",
            "content": {"application/json": {"schema": {"anyOf": [ref(openai), ref(anthropic)]}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return error_responses(ErrorResponse, _WHY, statuses)


def _event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI 3.2's event-stream description: `itemSchema` is one event, `schema` the whole stream."""
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json",
                     "contentSchema": {"oneOf": [ref(chunk), ref(ErrorResponse)]}}}
    done = {"type": "object", "required": ["data"], "properties": {"data": {"const": "[DONE]"}}}
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}},
            "schema": {"type": "array", "description": "`[DONE]` once, as the last event",
                       "contains": done, "minContains": 1, "maxContains": 1}}


def _generation(body: type[BaseModel], result: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    ok = {"description": "The completion as JSON; with `stream: true` server-sent events `data: <JSON>\\n\\n`: "
                         "chunks (one finish_reason per choice; with stream_options.include_usage a last chunk "
                         "with `choices: []` and usage), an error event if generation failed, and always "
                         "`data: [DONE]` last.",
          "content": {"application/json": {"schema": ref(result)}, "text/event-stream": _event_stream(chunk)}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}},
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 415, 500, 503, 504)}}


def _responses_create() -> dict[str, Any]:
    ok = {"description": "The Response as JSON; with `stream: true` typed server-sent events `event: <type>\\ndata: "
                         "<JSON>\\n\\n` numbered by sequence_number, the last `response.completed`, "
                         "`response.incomplete` or `response.failed` (or an `error` event); no `[DONE]`.",
          "content": {"application/json": {"schema": ref(ResponseObject)},
                      "text/event-stream": typed_event_stream(ref)}}
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}
    examples = {"streamed": {"value": {"input": "Hello", "stream": True, "max_output_tokens": 8}},
                "function_call": {"value": {"input": "Weather?", "tools": [tool], "tool_choice": "required",
                                            "stream": True, "max_output_tokens": 32}}}
    body = {"application/json": {"schema": ref(ResponsesRequest), "examples": examples}}
    return {"requestBody": {"required": True, "content": body},
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 415, 500, 503, 504)}}


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": ref(model)}}}

    probe = {"200": json_body(ProbeStatus, "OK."), "503": json_body(ProbeStatus, "Not alive (/health) or not ready.")}
    return {
        ("/v1/chat/completions", "post"): _generation(ChatCompletionRequest, ChatCompletion, ChatCompletionChunk),
        ("/v1/completions", "post"): _generation(CompletionRequest, Completion, CompletionChunk),
        ("/v1/responses", "post"): _responses_create(),
        ("/v1/responses/{response_id}", "get"): {"responses": {
            "200": json_body(ResponseObject, "The stored response."), **_errors(401),
            "404": json_body(ErrorResponse, "No stored response has this id (never stored, expired or deleted).")}},
        ("/v1/responses/{response_id}", "delete"): {"responses": {
            "200": json_body(ResponseDeleted, "Deleted."), **_errors(401),
            "404": json_body(ErrorResponse, "No stored response has this id.")}},
        ("/v1/models", "get"): {"responses": {"200": _models(ModelList, anthropic_openapi.AnthropicModelList,
                                                             "The served model."), **_errors(401)}},
        ("/v1/models/{model_id}", "get"): {"responses": {"200": _models(ModelCard, anthropic_openapi.AnthropicModelInfo,
                                                                        "The model."), **_errors(401, 404)}},
        ("/tokenize", "post"): {"requestBody": body(TokenizeRequest),
                                "responses": {"200": json_body(TokenizeResponse, "Token ids."),
                                              **_errors(400, 401, 404, 413, 415)}},
        ("/detokenize", "post"): {"requestBody": body(DetokenizeRequest),
                                  "responses": {"200": json_body(DetokenizeResponse, "Text."),
                                                **_errors(400, 401, 404, 413, 415)}},
        ("/health", "get"): {"responses": probe},
        ("/ready", "get"): {"responses": probe},
        ("/metrics", "get"): {"responses": {"200": {"description": "Prometheus text format.",
                                                    "content": {"text/plain": {"schema": {"type": "string"}}}}}},
        ("/", "get"): {"responses": {"200": json_body(ServerInfo, "Server name, model and uptime.")}},
        **anthropic_openapi.operations(),
    }


def build_openapi(app: FastAPI, api_keys: bool) -> dict[str, Any]:
    doc = get_openapi(title="glm-serve", version=app.version, routes=app.routes,
                      description="OpenAI-compatible server for GLM-5-class models.")
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    doc["openapi"] = "3.2.0"  # for `itemSchema`: the one way to describe a text/event-stream response
    components = doc.setdefault("components", {})
    components["schemas"] = defs["$defs"]  # FastAPI's own (HTTPValidationError) are never returned here
    for (path, method), spec in _operations().items():
        op = doc["paths"][path][method]
        op.pop("requestBody", None)
        op.update(spec)
        if api_keys and is_protected(path):
            op["security"] = [{"bearer": []}]
    if api_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def install_openapi(app: FastAPI, api_keys: bool) -> None:
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in cache:
            cache["doc"] = build_openapi(app, api_keys)
        return cache["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
