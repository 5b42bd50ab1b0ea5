"""Request models: OpenAI's chat/completions parameters plus vLLM's extensions, validated strictly.

Strict mode means no silent coercion: `"0.5"` is not a temperature, `true` is not an `n`, NaN and infinity
are refused. Unknown fields are ignored (as vLLM and OpenAI's newer fields require), but known OpenAI features
we do not implement (suffix, best_of > 1) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from service.engine.sampling_params import MAX_LOGPROBS, SamplingParams

# Stop conditions cost the engine per generated token and (stop strings) memory quadratic in their length, so a
# request may not bring arbitrarily many: OpenAI allows 4 stop strings; these limits leave room for vLLM-style use.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_CACHE_SALT_CHARS = 1024  # a salt needs ~43 characters (256 random bits in base64); more is only a cost
MAX_LOGIT_BIAS = 1024  # entries; OpenAI allows 300
MAX_BAD_WORDS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# The OpenAPI document (service/api/openapi.py) shows what the validators accept, so that clients and fuzzers see
# the real contract: these schemas restate rules that live in validators below.
def _nullable(*schemas: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [*schemas, {"type": "null"}]})


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}
_STOP_SCHEMA = _nullable(_STOP_STRING, {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": _STOP_STRING})
_STREAM_OPTIONS_RULE = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
_LOGIT_BIAS = {"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"]}, "strict": {"type": ["boolean", "null"]}}}}}
_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                    "properties": {"name": {"type": "string"}}}}}]}
_RESPONSE_FORMAT = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                                                         "strict": {"type": ["boolean", "null"]}}}}}]}
# vLLM's StructuredOutputsParams: one of these given; a null (or json_object false) is a field not given, so a
# serialized params object with its other fields null is read as the one it sets.
_STRUCTURED_OUTPUTS = {"type": "object", "properties": {
    "json": {"type": ["object", "string", "null"]}, "regex": {"type": ["string", "null"]},
    "choice": {"anyOf": [{"type": "array", "minItems": 1, "items": {"type": "string"}}, {"type": "null"}]},
    "grammar": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]},
    "json_object": {"type": ["boolean", "null"]}}}
_TOP_LOGPROBS_RULE = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"minimum": 1}}},
                      "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _SamplingRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_RULE]})
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Annotated[str | list[str] | None, _STOP_SCHEMA] = None
    stop_token_ids: Annotated[list[int] | None, _nullable({**_IDS, "maxItems": MAX_STOP_TOKEN_IDS})] = Field(
        None, max_length=MAX_STOP_TOKEN_IDS)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=20.0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's: prefix-cache entries are shared only between requests with the same salt (one per tenant).
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    logit_bias: Annotated[dict[str, Any] | None, _nullable(_LOGIT_BIAS)] = None
    allowed_token_ids: Annotated[list[int] | None, _nullable({**_IDS, "minItems": 1})] = Field(None, min_length=1)
    bad_words: Annotated[list[str] | None, _nullable(
        {"type": "array", "maxItems": MAX_BAD_WORDS, "items": {"type": "string", "minLength": 1}})] = Field(
        None, max_length=MAX_BAD_WORDS)
    structured_outputs: Annotated[dict[str, Any] | None, _nullable(_STRUCTURED_OUTPUTS)] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _common(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r}")
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
        if any(not w for w in self.bad_words or []):
            raise ValueError("bad_words must not be empty strings")
        if self.structured_outputs is not None and len(self.structured_outputs) > 1:
            raise ValueError("structured_outputs takes one of json, regex, choice, grammar")
        return self

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        defaults: dict[str, Any], bad_words_token_ids: list[list[int]] | None = None,
                        structured: str | None = None) -> SamplingParams:
        """Request values first, then the checkpoint's generation_config.json, then SamplingParams' own."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), seed=self.seed, max_tokens=max_tokens, stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            skip_special_tokens=self.skip_special_tokens, cache_salt=self.cache_salt,
            logit_bias=self.logit_bias_ids or None,
            allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
            bad_words_token_ids=bad_words_token_ids or None, structured=structured)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def check_tool_choice_mode(choice: Any, names: list[str]) -> None:
    """A tool_choice that is not the named-function object: absent, or 'none' / 'auto' / 'required' ('required'
    needs a tool). Shared by chat completions and Responses, which spell only the named form differently."""
    if choice is None:
        return
    if not isinstance(choice, str):
        raise ValueError("tool_choice must be a string or an object")
    if choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}")
    if choice == "required" and not names:
        raise ValueError("tool_choice 'required' needs at least one tool in tools")


def check_named_tool(name: str, names: list[str]) -> None:
    if name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")


def _check_content(content: Any, role: str) -> Any:
    if content is None:
        if role not in ("assistant",):
            raise ValueError(f"content is required for role {role!r}")
        return None
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of content parts")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"content[{i}] must be an object with a 'type'")
        if part["type"] != "text":
            raise ValueError(f"content[{i}]: content part type {part['type']!r} is not supported (text only)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content[{i}]: a text part needs a string 'text'")
    return content


# What the validators below accept, for the OpenAPI document (the fields are `Any` so the validators phrase errors)
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                            _TOKEN_IDS, {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]}


_TOOL_CALLS_SCHEMA = {"type": "array", "items": {  # OpenAI's shape; the chat template reads it
    "type": "object", "required": ["function"], "properties": {"function": {
        "type": "object", "required": ["name", "arguments"],
        "properties": {"name": {"type": "string"}, "arguments": {"type": ["string", "object"]}}}}}}
_MESSAGE_RULE = {"anyOf": [  # content, or an assistant message with tool calls
    {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
    {"required": ["role", "tool_calls"],
     "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}}]}


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False,  # templates may read extras
                              json_schema_extra=_MESSAGE_RULE)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = None
    tool_calls: Annotated[list[dict[str, Any]] | None, _nullable(_TOOL_CALLS_SCHEMA)] = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role == "assistant" and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        self.content = _check_content(self.content, self.role)
        for i, call in enumerate(self.tool_calls or []):  # OpenAI's shape, which chat templates read
            fn = call.get("function")
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                    and isinstance(fn.get("arguments"), str | dict)):
                raise ValueError(f"tool_calls[{i}] must have a function with a string name and arguments")
        return self

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if message["role"] == "developer":  # OpenAI's newer name for the system role; templates know system
            message["role"] = "system"
        message.setdefault("content", None)
        for call in message.get("tool_calls") or []:  # templates iterate arguments: give them the object
            fn = call.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    args = json.loads(fn["arguments"])
                except ValueError:
                    continue
                if isinstance(args, dict):
                    fn["arguments"] = args
        return message


class ChatCompletionRequest(_SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_RULE, _TOP_LOGPROBS_RULE]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[dict[str, Any]] | None, _nullable({"type": "array", "items": _TOOL})] = None
    tool_choice: Annotated[str | dict[str, Any] | None, WithJsonSchema(
        {"anyOf": [*_TOOL_CHOICE["anyOf"], {"type": "null"}]})] = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(
        {"anyOf": [*_RESPONSE_FORMAT["anyOf"], {"type": "null"}]})] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's: reasoning tokens before `</think>` is forced

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        names = []
        for i, tool in enumerate(self.tools or []):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not fn["name"]:
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
            if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
                raise ValueError(f"tools[{i}].function.strict must be a boolean")
            if fn.get("description") is not None and not isinstance(fn["description"], str):
                raise ValueError(f"tools[{i}].function.description must be a string")
            names.append(fn["name"])
        choice = self.tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}}")
            check_named_tool(name, names)
        else:
            check_tool_choice_mode(choice, names)
        rf = self.response_format
        if rf is not None and rf.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")
        return self

    @property
    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools one of which must be called (tool_choice required or named), else None."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools or [] if t["function"]["name"] == name][:1]
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True
    suffix: Annotated[str | None, _nullable({"const": ""})] = None
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(
        {"anyOf": [*_RESPONSE_FORMAT["anyOf"], {"type": "null"}]})] = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return check_prompt(v)

    @model_validator(mode="after")
    def _completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n when given)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per engine request: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_prompt(v: Any) -> Any:
    """A string, a list of strings, a list of token ids or a list of lists of token ids; never empty."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                         "of token ids, and not empty")
    if all(isinstance(x, str) for x in v) or all(_is_int(x) for x in v):
        return v
    if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v):
        return v
    raise ValueError("prompt lists must hold only strings, only token ids, or only non-empty lists of token ids")


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: either `prompt` (text) or `messages` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1}}}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages (vLLM)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[int], WithJsonSchema(_IDS)]
