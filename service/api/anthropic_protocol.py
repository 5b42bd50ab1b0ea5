"""Anthropic Messages API request models (`POST /v1/messages`, `/v1/messages/count_tokens`), validated strictly,
and their translation into a ChatCompletionRequest: the one chat path renders, plans and generates them.

Content blocks are checked by hand so a client learns which block is wrong and why: text, tool_use, tool_result
and thinking are read; images, documents and server tools are refused with a 400 (this server reads text only);
redacted_thinking is dropped (it is opaque to anyone but Anthropic).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from service.api.protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, ChatCompletionRequest, _Strict

_TEXT = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_TOOL_USE = {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
    "type": {"const": "tool_use"}, "id": {"type": "string"}, "name": {"type": "string", "minLength": 1},
    "input": {"type": "object"}}}
_TOOL_RESULT = {"type": "object", "required": ["type", "tool_use_id"], "properties": {
    "type": {"const": "tool_result"}, "tool_use_id": {"type": "string"},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT}]}, "is_error": {"type": "boolean"}}}
_THINKING = {"type": "object", "required": ["type", "thinking"], "properties": {
    "type": {"const": "thinking"}, "thinking": {"type": "string"}, "signature": {"type": "string"}}}
_REDACTED = {"type": "object", "required": ["type"], "properties": {"type": {"const": "redacted_thinking"}}}
_BLOCKS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "anyOf": [_TEXT, _TOOL_USE, _TOOL_RESULT, _THINKING, _REDACTED]}}]}
_SYSTEM = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT}, {"type": "null"}]}
_TOOL = {"type": "object", "required": ["name", "input_schema"], "properties": {
    "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
    "input_schema": {"type": "object"}, "type": {"enum": ["custom"]}}}
_TOOL_CHOICE = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
    "disable_parallel_tool_use": {"type": "boolean"}},
    "if": {"properties": {"type": {"const": "tool"}}}, "then": {"required": ["name"]}}
_THINKING_CONFIG = {"anyOf": [
    {"type": "object", "required": ["type", "budget_tokens"],
     "properties": {"type": {"const": "enabled"}, "budget_tokens": {"type": "integer", "minimum": 1}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["disabled", "adaptive"]}}},
    {"type": "null"}]}
_STOP_SEQUENCES = {"anyOf": [{"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {
    "type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}}, {"type": "null"}]}
_UNREAD = {"image": "image", "document": "document (PDF or text file)", "search_result": "search_result",
           "container_upload": "container_upload"}


def _text_blocks(blocks: list[Any], where: str) -> str:
    """The text of a list of text blocks (system, tool_result content), joined by newlines."""
    texts = []
    for i, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if isinstance(kind, str) and kind in _UNREAD:  # a dict or list 'type' is not hashable: the next check
            raise ValueError(f"{where}[{i}]: {_UNREAD[kind]} blocks are not supported (this server reads text only)")
        if kind != "text" or not isinstance(b.get("text"), str):
            raise ValueError(f"{where}[{i}] must be a text block {{'type': 'text', 'text': ...}}")
        texts.append(b["text"])
    return "\n".join(texts)


def _block(b: Any, role: str, where: str) -> dict[str, Any] | None:
    """One content block checked and reduced to what the chat template reads (None: dropped)."""
    kind = b.get("type") if isinstance(b, dict) else None
    if not isinstance(kind, str):
        raise ValueError(f"{where} must be an object with a 'type'")
    if kind in _UNREAD:
        raise ValueError(f"{where}: {_UNREAD[kind]} blocks are not supported (this server reads text only)")
    if kind == "text":
        if not isinstance(b.get("text"), str):
            raise ValueError(f"{where}: a text block needs a string 'text'")
        return {"type": "text", "text": b["text"]}
    if kind == "tool_use" and role == "assistant":
        if not (isinstance(b.get("id"), str) and isinstance(b.get("name"), str) and b["name"]
                and isinstance(b.get("input"), dict)):
            raise ValueError(f"{where}: a tool_use block needs a string 'id', a 'name' and an object 'input'")
        return {"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]}
    if kind == "tool_result" and role == "user":
        if not isinstance(b.get("tool_use_id"), str):
            raise ValueError(f"{where}: a tool_result block needs a string 'tool_use_id'")
        content = b.get("content", "")
        if isinstance(content, list):
            content = _text_blocks(content, f"{where}.content")
        elif not isinstance(content, str):
            raise ValueError(f"{where}: tool_result content must be a string or a list of text blocks")
        if not isinstance(b.get("is_error", False), bool):
            raise ValueError(f"{where}: is_error must be a boolean")
        return {"type": "tool_result", "tool_use_id": b["tool_use_id"], "content": content,
                "is_error": b.get("is_error", False)}
    if kind == "thinking" and role == "assistant":
        if not isinstance(b.get("thinking"), str) or not isinstance(b.get("signature", ""), str):
            raise ValueError(f"{where}: a thinking block needs a string 'thinking' (and a string 'signature')")
        return {"type": "thinking", "thinking": b["thinking"]}
    if kind == "redacted_thinking" and role == "assistant":
        return None
    raise ValueError(f"{where}: a {kind!r} block is not supported in a {role} message")


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Annotated[Any, WithJsonSchema(_BLOCKS)]

    @model_validator(mode="after")
    def _blocks(self) -> InputMessage:
        if isinstance(self.content, str):
            self.content = [{"type": "text", "text": self.content}]
        elif isinstance(self.content, list):
            blocks = [_block(b, self.role, f"content[{i}]") for i, b in enumerate(self.content)]
            self.content = [b for b in blocks if b is not None]
        else:
            raise ValueError("content must be a string or a list of content blocks")
        return self


class _MessagesBase(_Strict):
    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: Annotated[str | list[dict[str, Any]] | None, WithJsonSchema(_SYSTEM)] = None
    tools: Annotated[list[dict[str, Any]] | None, WithJsonSchema(
        {"anyOf": [{"type": "array", "items": _TOOL}, {"type": "null"}]})] = None
    tool_choice: Annotated[dict[str, Any] | None, WithJsonSchema({"anyOf": [_TOOL_CHOICE, {"type": "null"}]})] = None
    thinking: Annotated[dict[str, Any] | None, WithJsonSchema(_THINKING_CONFIG)] = None

    @field_validator("system")
    @classmethod
    def _system(cls, v: str | list[dict[str, Any]] | None) -> str | None:
        return _text_blocks(v, "system") if isinstance(v, list) else v

    @model_validator(mode="after")
    def _tools(self) -> _MessagesBase:
        names = []
        for i, tool in enumerate(self.tools or []):
            kind = tool.get("type", "custom")
            if kind != "custom":
                raise ValueError(f"tools[{i}]: the server tool {kind!r} is not supported; give client tools "
                                 "({'name', 'description', 'input_schema'})")
            if not isinstance(tool.get("name"), str) or not tool["name"] or \
                    not isinstance(tool.get("input_schema"), dict):
                raise ValueError(f"tools[{i}] needs a 'name' and an 'input_schema' object")
            if not isinstance(tool.get("description", ""), str):
                raise ValueError(f"tools[{i}].description must be a string")
            names.append(tool["name"])
        choice = self.tool_choice
        if choice is not None:
            kind = choice.get("type")
            if kind not in ("auto", "any", "tool", "none"):
                raise ValueError("tool_choice.type must be 'auto', 'any', 'tool' or 'none'")
            if not isinstance(choice.get("name", ""), str):
                raise ValueError("tool_choice.name must be a string")
            if not isinstance(choice.get("disable_parallel_tool_use", False), bool):
                raise ValueError("tool_choice.disable_parallel_tool_use must be a boolean")
            if kind == "any" and not names:
                raise ValueError("tool_choice 'any' needs at least one tool in tools")
            if kind == "tool" and choice.get("name") not in names:
                raise ValueError(f"tool_choice names the tool {choice.get('name')!r}, which is not in tools")
        thinking = self.thinking
        if thinking is not None:
            kind = thinking.get("type")
            budget = thinking.get("budget_tokens")
            if kind == "enabled":
                if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
                    raise ValueError("thinking.budget_tokens must be a positive integer")
            elif kind not in ("disabled", "adaptive"):
                raise ValueError("thinking.type must be 'enabled', 'disabled' or 'adaptive'")
        return self

    def to_chat(self, max_tokens: int | None, **sampling: Any) -> ChatCompletionRequest:
        """The same request as chat completions: messages, tools and choice, thinking, sampling."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for m in self.messages:
            messages.extend(_chat_messages(m))
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens, **sampling}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t["name"], "description": t.get("description", ""), "parameters": t["input_schema"]}}
                for t in self.tools]
        if self.tool_choice is not None:
            kind = self.tool_choice["type"]
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or \
                {"type": "function", "function": {"name": self.tool_choice["name"]}}
            if "disable_parallel_tool_use" in self.tool_choice:
                body["parallel_tool_calls"] = not self.tool_choice["disable_parallel_tool_use"]
        if self.thinking is not None:
            kind = self.thinking["type"]
            body["chat_template_kwargs"] = {"enable_thinking": kind != "disabled"}
            if kind == "enabled":
                body["thinking_token_budget"] = self.thinking["budget_tokens"]
        return ChatCompletionRequest.model_validate(body)


def _chat_messages(m: InputMessage) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: an assistant turn with reasoning, text and tool calls; a user turn
    as its tool results (role "tool", in order) and its text."""
    if m.role == "assistant":
        text = "".join(b["text"] for b in m.content if b["type"] == "text")
        reasoning = "".join(b["thinking"] for b in m.content if b["type"] == "thinking")
        calls = [{"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"]}}
                 for b in m.content if b["type"] == "tool_use"]
        out: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            out["reasoning_content"] = reasoning
        if calls:
            out["tool_calls"] = calls
        return [out]
    messages: list[dict[str, Any]] = []
    texts: list[str] = []
    for b in m.content:
        if b["type"] == "text":
            texts.append(b["text"])
            continue
        if texts:
            messages.append({"role": "user", "content": "\n".join(texts)})
            texts = []
        content = ("Error: " + b["content"]) if b["is_error"] else b["content"]
        messages.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content})
    if texts or not messages:
        messages.append({"role": "user", "content": "\n".join(texts)})
    return messages


class MessagesRequest(_MessagesBase):
    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[str] | None, WithJsonSchema(_STOP_SEQUENCES)] = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None  # accepted (user_id); nothing here reads it
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(v)}")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in v or []):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_STRING_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _budget(self) -> MessagesRequest:
        budget = (self.thinking or {}).get("budget_tokens") if (self.thinking or {}).get("type") == "enabled" \
            else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({self.max_tokens})")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        return self.to_chat(self.max_tokens, stop=self.stop_sequences, temperature=self.temperature,
                            top_p=self.top_p, top_k=self.top_k)


class CountTokensRequest(_MessagesBase):
    """`/v1/messages/count_tokens`: the prompt part of a Messages request (no max_tokens, nothing sampled)."""

    def chat_request(self) -> ChatCompletionRequest:
        return self.to_chat(None)
