"""The OpenAI Responses API request (`POST /v1/responses`) and its translation into a chat request.

The Responses API is chat in other words: `instructions` is the system message, `input` items are messages
(`input_text` / `output_text` parts), an assistant's `function_call`s are its `tool_calls`, a
`function_call_output` is a `tool` message and a `reasoning` item is the next assistant message's
`reasoning_content`. `to_chat` builds that ChatCompletionRequest; the chat path (chat.start_chat) does the rest.

Validation is strict as everywhere (protocol.py): no coercion, 400s that name the field, unknown fields ignored,
and what glm-serve cannot do is refused rather than dropped: built-in tools (web search, file search, computer
use, code interpreter, ...), image and file inputs, background mode, stored conversations and prompt templates.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from service.api.protocol import (
    _LOGIT_BIAS,
    _STOP_SCHEMA,
    ChatCompletionRequest,
    _nullable,
    _Strict,
    check_named_tool,
    check_tool_choice_mode,
)

MAX_METADATA_KEYS = 16  # OpenAI's limits
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
# `reasoning.effort`: these two turn thinking off (the template's enable_thinking: false); the others turn it on.
THINKING_OFF = ("none", "minimal")
VLLM_EXTENSIONS = ("top_k", "min_p", "seed", "repetition_penalty", "stop", "logit_bias")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

# What the validators below accept, for the OpenAPI document (fields are `Any` so the validators phrase errors).
_TEXT = {"type": "string"}
_PART = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": _TEXT}}
_CONTENT = {"anyOf": [_TEXT, {"type": "array", "items": _PART}]}
_TEXTS = {"type": "array", "items": {"type": "object", "required": ["text"], "properties": {"text": _TEXT}}}
_ITEM = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": _CONTENT}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1}, "arguments": _TEXT}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string", "minLength": 1},
        "output": _CONTENT}},
    {"type": "object", "required": ["type"], "properties": {
        "type": {"const": "reasoning"}, "summary": _TEXTS, "content": _TEXTS}}]}
_INPUT = {"anyOf": [_TEXT, {"type": "array", "items": _ITEM}]}
_FUNCTION_TOOL = {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"const": "function"}, "name": {"type": "string", "minLength": 1},
    "description": {"type": ["string", "null"]},
    "parameters": {"type": ["object", "null"]}, "strict": {"type": ["boolean", "null"]}}}
_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "name"],
    "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}, {"type": "null"}]}
_FORMAT = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"], "properties": {
        "type": {"const": "json_schema"}, "name": {"type": "string", "minLength": 1}, "schema": {"type": "object"},
        "description": {"type": ["string", "null"]}, "strict": {"type": ["boolean", "null"]}}},
    {"type": "null"}]}
_TEXT_CONFIG = {"anyOf": [{"type": "object", "properties": {"format": _FORMAT}}, {"type": "null"}]}
_REASONING = {"anyOf": [{"type": "object", "properties": {"effort": {"enum": [*EFFORTS, None]}}}, {"type": "null"}]}
_METADATA = {"anyOf": [{"type": "object", "maxProperties": MAX_METADATA_KEYS,
                        "propertyNames": {"maxLength": MAX_METADATA_KEY_CHARS},
                        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_CHARS}},
                       {"type": "null"}]}


def _text_of(content: Any, where: str) -> str:
    """A message's content (a string, or input_text / output_text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text"):
            shown = f"type {kind!r} is" if isinstance(kind, str) else "without a 'type' is"
            raise ValueError(f"{where}[{i}]: a content part {shown} not supported (input_text and output_text only)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{i}] needs a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _check_item(item: Any, i: int) -> dict[str, Any]:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object")
    kind = item.get("type", "message")
    if kind not in ITEM_TYPES:
        raise ValueError(f"{where}: item type {kind!r} is not supported ({', '.join(ITEM_TYPES)})")
    if kind == "message":
        if item.get("role") not in ("user", "system", "developer", "assistant"):
            raise ValueError(f"{where}.role must be 'user', 'system', 'developer' or 'assistant'")
        if "content" not in item:
            raise ValueError(f"{where} needs content")
        _text_of(item["content"], f"{where}.content")
    elif kind == "function_call":
        for key in ("call_id", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ValueError(f"{where}.{key} must be a non-empty string")
        if not isinstance(item.get("arguments"), str):
            raise ValueError(f"{where}.arguments must be a string (JSON)")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise ValueError(f"{where}.call_id must be a non-empty string")
        if "output" not in item:
            raise ValueError(f"{where} needs output")
        _text_of(item["output"], f"{where}.output")
    else:
        for key in ("summary", "content"):
            parts = item.get(key)
            if parts is not None and not (isinstance(parts, list)
                                          and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts)):
                raise ValueError(f"{where}.{key} must be a list of objects with a string 'text'")
    return item


class ResponsesRequest(_Strict):
    model: str | None = None
    input: Annotated[Any, WithJsonSchema(_INPUT)]
    instructions: str | None = None
    tools: Annotated[list[Any] | None, WithJsonSchema(
        {"anyOf": [{"type": "array", "items": _FUNCTION_TOOL}, {"type": "null"}]})] = None
    tool_choice: Annotated[Any, WithJsonSchema(_TOOL_CHOICE)] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: Annotated[dict[str, Any] | None, WithJsonSchema(_TEXT_CONFIG)] = None
    reasoning: Annotated[dict[str, Any] | None, WithJsonSchema(_REASONING)] = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1)
    metadata: Annotated[dict[str, str] | None, WithJsonSchema(_METADATA)] = None
    user: str | None = None
    include: list[str] | None = None  # e.g. Codex's reasoning.encrypted_content: there is nothing to encrypt
    background: Annotated[bool | None, WithJsonSchema({"enum": [False, None]})] = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop context silently
    # vLLM's sampling extensions (the openai SDK sends them in extra_body); the chat request validates them.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    repetition_penalty: float | None = Field(None, gt=0.0, le=20.0)
    stop: Annotated[str | list[str] | None, _STOP_SCHEMA] = None
    logit_bias: Annotated[dict[str, Any] | None, _nullable(_LOGIT_BIAS)] = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("input must be a string or a list of items")
        return [_check_item(item, i) for i, item in enumerate(v)]

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools: list[Any] | None) -> list[Any] | None:
        for i, tool in enumerate(tools or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}]: tool type {kind!r} is not supported; glm-serve runs no built-in "
                                 "tools (web search, file search, computer use, code interpreter, ...), only "
                                 "{'type': 'function', 'name': ...} tools your client executes")
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise ValueError(f"tools[{i}].name must be a non-empty string")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise ValueError(f"tools[{i}].parameters must be a JSON schema object")
            for key, types in (("description", str), ("strict", bool)):
                if tool.get(key) is not None and not isinstance(tool[key], types):
                    raise ValueError(f"tools[{i}].{key} must be a {types.__name__}")
        return tools

    @field_validator("text")
    @classmethod
    def _text(cls, text: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = (text or {}).get("format")
        if fmt is None:
            return text
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("text.format.type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            if not isinstance(fmt.get("name"), str) or not fmt["name"]:
                raise ValueError("text.format.name must be a non-empty string")
            if not isinstance(fmt.get("schema"), dict):
                raise ValueError("text.format.schema must be a JSON schema object")
            if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
                raise ValueError("text.format.strict must be a boolean")
            if fmt.get("description") is not None and not isinstance(fmt["description"], str):
                raise ValueError("text.format.description must be a string")
        return text

    @field_validator("reasoning")
    @classmethod
    def _reasoning(cls, reasoning: dict[str, Any] | None) -> dict[str, Any] | None:
        effort = (reasoning or {}).get("effort")
        if effort is not None and effort not in EFFORTS:
            raise ValueError(f"reasoning.effort must be one of {', '.join(EFFORTS)}")
        return reasoning

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and (len(metadata) > MAX_METADATA_KEYS
                                     or any(len(k) > MAX_METADATA_KEY_CHARS for k in metadata)
                                     or any(len(v) > MAX_METADATA_VALUE_CHARS for v in metadata.values())):
            raise ValueError(f"metadata holds at most {MAX_METADATA_KEYS} keys of up to {MAX_METADATA_KEY_CHARS} "
                             f"characters, with values of up to {MAX_METADATA_VALUE_CHARS}")
        return metadata

    @field_validator("background")
    @classmethod
    def _background(cls, background: bool | None) -> bool | None:
        if background:
            raise ValueError("background mode is not supported; stream instead")
        return background

    @model_validator(mode="after")
    def _tool_choice(self) -> ResponsesRequest:
        names = [t["name"] for t in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise ValueError(f"tool_choice type {choice.get('type')!r} is not supported; use 'none', 'auto', "
                                 "'required' or {'type': 'function', 'name': ...}")
            check_named_tool(choice["name"], names)
        else:
            check_tool_choice_mode(choice, names)
        return self

    # -- translation -------------------------------------------------------------------------------------------
    def input_items(self) -> list[dict[str, Any]]:
        """`input` as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return list(self.input)

    def echo_tools(self) -> list[dict[str, Any]]:
        """The tools as a Response echoes them (OpenAI fills in the optional fields)."""
        return [{"type": "function", "name": t["name"], "description": t.get("description"),
                 "parameters": t.get("parameters"), "strict": t.get("strict", True)} for t in self.tools or []]


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items -> chat messages the chat template renders. Consecutive function calls (and the assistant
    text before them) make one assistant message; a reasoning item goes to the next assistant message."""
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []
    open_assistant = False  # the last message is an assistant turn further calls may join

    def assistant(content: str | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        messages.append(msg)
        return msg

    for item in items:
        kind = item.get("type", "message")
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append("".join(p["text"] for p in parts))
        elif kind == "message":
            text = _text_of(item["content"], "content")
            if item["role"] == "assistant":
                assistant(text)
                open_assistant = True
            else:
                messages.append({"role": item["role"], "content": text})
                open_assistant = False
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            msg = messages[-1] if open_assistant and not reasoning else assistant(None)
            msg.setdefault("tool_calls", []).append(call)
            open_assistant = True
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(item["output"], "output")})
            open_assistant = False
    return messages


def to_chat(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that answers `req` over the conversation `items` (stored history, then `req.input`)."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) \
        + items_to_messages(items)
    if not messages:
        raise ValueError("input is empty: give at least one item (or instructions)")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p, "user": req.user,
                            "parallel_tool_calls": req.parallel_tool_calls}
    body.update({k: getattr(req, k) for k in VLLM_EXTENSIONS})
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}}
            for t in req.tools]
    choice = req.tool_choice
    body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}} \
        if isinstance(choice, dict) else choice
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt["type"] == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt["name"], "schema": fmt["schema"], "strict": fmt.get("strict")}}
    elif isinstance(fmt, dict):
        body["response_format"] = {"type": fmt["type"]}
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": effort not in THINKING_OFF}
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
