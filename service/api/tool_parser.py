"""GLM tool calls in generated text -> OpenAI `tool_calls`, incrementally (one parser per choice).

The format (GLM-4.7 / GLM-5; GLM-4.5/4.6 put newlines between the parts, so whitespace is allowed wherever one
may stand):

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

`feed()` takes text as it arrives and returns what is now certain: content outside the calls, a call's header
(index, id, name) once its name is complete, and fragments of its `arguments` JSON. A string-typed value streams
character by character; any other value is held until its `</arg_value>` and then converted by the tool's
schema. Text that could still be the start of a tag is held back, so tag text never reaches `content`. The
non-streaming answer runs the same parser over the whole text, so the concatenated fragments of a stream are the
non-streamed `arguments` exactly, however the text was cut.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
TOOL_TAGS = (TOOL_OPEN, TOOL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set (with name) on a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolParse:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ToolParse) -> None:
        self.content += other.content
        for c in other.calls:
            last = self.calls[-1] if self.calls else None
            if last is not None and last.index == c.index and c.id is None:
                last.arguments += c.arguments  # merge argument fragments of the same call
            else:
                self.calls.append(ToolCallDelta(c.index, c.id, c.name, c.arguments))


def _held_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags` (it may still become one)."""
    longest = max(len(t) for t in tags)
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(t.startswith(tail) for t in tags):
            return n
    return 0


def admitted_types(schema: Any) -> frozenset[str]:
    """The JSON types a (sub)schema admits, as far as `type`, `enum`, `const`, `anyOf`/`oneOf` tell; unknown
    shapes ($ref, no type) admit everything."""
    if not isinstance(schema, dict):
        return _JSON_TYPES
    if "const" in schema:
        return frozenset({_json_type(schema["const"])})
    if isinstance(schema.get("enum"), list):
        return frozenset(_json_type(v) for v in schema["enum"])
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset({t, "number"} if t == "integer" else {t})
    if isinstance(t, list):
        return frozenset(x for x in t if isinstance(x, str)) | ({"number"} if "integer" in t else set())
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out: set[str] = set()
            for sub in schema[key]:
                out |= admitted_types(sub)
            return frozenset(out)
    return _JSON_TYPES


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def convert_value(raw: str, types: frozenset[str]) -> Any:
    """A non-string argument: JSON, else a Python literal, else the raw text. A parse whose type the schema does
    not admit falls back to the raw text when the schema admits strings (Optional[str] given "123" stays "123")."""
    text = raw.strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
            json.dumps(value, allow_nan=False)  # tuples become lists; sets, bytes and NaN are refused
        except Exception:  # noqa: BLE001 - any failure (syntax, recursion, type) means "not this reading"
            continue
        if isinstance(value, tuple):
            value = list(value)
        if _json_type(value) in types or "string" not in types:
            return value
        return raw
    return raw


class GlmToolParser:
    """Incremental parser for one choice. `tools` is the request's OpenAI tool list (for argument types)."""

    def __init__(self, tools: list[dict[str, Any]] | None = None, make_id: Callable[[], str] = new_call_id) -> None:
        self.properties: dict[str, dict[str, Any]] = {}
        for tool in tools or []:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                props = params.get("properties") if isinstance(params, dict) else None
                self.properties[fn["name"]] = props if isinstance(props, dict) else {}
        self.make_id = make_id
        self.buf = ""
        self.state = "text"  # text | name | args | key | before_value | value
        self.pending_ws = ""  # whitespace in content, dropped if a tool call or the end follows a call
        self.num_calls = 0
        self.name = ""
        self.key = ""
        self.num_args = 0
        self.value_is_string = False
        self.value_started = False  # a string value has emitted a character (leading whitespace is skipped)
        self.value_ws = ""  # whitespace at the current end of a string value, emitted only if text follows

    def feed(self, text: str) -> ToolParse:
        self.buf += text
        out = ToolParse()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> ToolParse:
        """The text has ended: release held content and close a call left open."""
        out = ToolParse()
        while self._step(out, final=True):
            pass
        if self.state == "text":
            if self.num_calls == 0:
                out.content += self.pending_ws
        else:
            if self.state == "name" and self.buf.strip():
                self._open_call(out, self.buf.strip())
            elif self.state == "value":
                self._end_value(out, self.buf)
            if self.state != "name" or self.buf.strip():  # a bare "<tool_call>" at the end names nothing
                self._close_call(out)
        self.buf, self.pending_ws = "", ""
        return out

    # -- the state machine: each step consumes a piece of `buf`, or returns False to wait for more ------------
    def _step(self, out: ToolParse, final: bool) -> bool:
        buf = self.buf
        if self.state == "text":
            i = buf.find(TOOL_OPEN)
            if i < 0:
                keep = 0 if final else _held_prefix(buf, (TOOL_OPEN,))
                self._content(out, buf[: len(buf) - keep])
                self.buf = buf[len(buf) - keep:]
                return False
            self._content(out, buf[:i])
            self.pending_ws = ""  # whitespace right before a call is layout, not content
            self.buf, self.state = buf[i + len(TOOL_OPEN):], "name"
            return True
        if self.state == "name":
            stripped = buf.lstrip()
            end = next((j for j, ch in enumerate(stripped) if ch == "<" or ch.isspace()), -1)
            if end < 0:
                return False
            self._open_call(out, stripped[:end])
            self.buf, self.state = stripped[end:], "args"
            return True
        if self.state == "args":
            stripped = buf.lstrip()
            if stripped.startswith(KEY_OPEN):
                self.buf, self.state = stripped[len(KEY_OPEN):], "key"
                return True
            if stripped.startswith(TOOL_CLOSE):
                self.buf = stripped[len(TOOL_CLOSE):]
                self._close_call(out)
                return True
            # Anything else is noise inside the call: skip to the next tag, keep a tail that may start one.
            nxt = [j for j in (stripped.find(KEY_OPEN), stripped.find(TOOL_CLOSE)) if j >= 0]
            cut = min(nxt) if nxt else len(stripped) - (0 if final else _held_prefix(stripped, (KEY_OPEN, TOOL_CLOSE)))
            self.buf = stripped[cut:]
            return bool(nxt)
        if self.state == "key":
            i = buf.find(KEY_CLOSE)
            if i < 0:
                return False
            self.key = buf[:i].strip()
            self.buf, self.state = buf[i + len(KEY_CLOSE):], "before_value"
            return True
        if self.state == "before_value":
            stripped = buf.lstrip()
            if not stripped.startswith(VALUE_OPEN):
                if len(stripped) >= len(VALUE_OPEN) or final:  # malformed: treat what follows as the value
                    self._start_value(out)
                    self.buf, self.state = stripped, "value"
                    return True
                self.buf = stripped
                return False
            self._start_value(out)
            self.buf, self.state = stripped[len(VALUE_OPEN):], "value"
            return True
        # value
        i = buf.find(VALUE_CLOSE)
        if i < 0:
            if self.value_is_string:
                keep = 0 if final else _held_prefix(buf, (VALUE_CLOSE,))
                self._string_piece(out, buf[: len(buf) - keep])
                self.buf = buf[len(buf) - keep:]
            return False  # a typed value waits whole in `buf` for its closing tag
        self._end_value(out, buf[:i])
        self.buf, self.state = buf[i + len(VALUE_CLOSE):], "args"
        return True

    # -- pieces of output -------------------------------------------------------------------------------------
    def _content(self, out: ToolParse, text: str) -> None:
        """Content outside calls; trailing whitespace waits to see whether a call (or, after a call, the end)
        follows it."""
        if not text:
            return
        body = text.rstrip()
        if not body:
            self.pending_ws += text
            return
        out.content += self.pending_ws + body
        self.pending_ws = text[len(body):]

    def _open_call(self, out: ToolParse, name: str) -> None:
        self.name, self.num_args = name, 0
        out.calls.append(ToolCallDelta(self.num_calls, id=self.make_id(), name=name))
        self.num_calls += 1

    def _close_call(self, out: ToolParse) -> None:
        out.calls.append(ToolCallDelta(self.num_calls - 1, arguments="}" if self.num_args else "{}"))
        self.state, self.num_args = "text", 0

    def _start_value(self, out: ToolParse) -> None:
        schema = self.properties.get(self.name, {}).get(self.key)
        self.value_is_string = schema is not None and admitted_types(schema) == {"string"}
        self.value_started, self.value_ws = False, ""
        head = ("{" if self.num_args == 0 else ", ") + json.dumps(self.key, ensure_ascii=False) + ": "
        out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=head + ('"' if self.value_is_string else "")))
        self.num_args += 1

    def _end_value(self, out: ToolParse, tail: str) -> None:
        if self.value_is_string:
            self._string_piece(out, tail)
            text = '"'
        else:
            schema = self.properties.get(self.name, {}).get(self.key)
            types = admitted_types(schema) if schema is not None else _JSON_TYPES
            text = json.dumps(convert_value(tail, types), ensure_ascii=False)
        out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))


    def _string_piece(self, out: ToolParse, text: str) -> None:
        """Stream part of a string value. Whitespace around a value is layout (the grammar allows it there, as
        XML does), so leading whitespace is skipped and trailing whitespace waits to see if text follows."""
        if not self.value_started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self.value_ws += text
            return
        out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=_escape(self.value_ws + body)))
        self.value_started, self.value_ws = True, text[len(body):]


def _escape(text: str) -> str:
    """JSON string escaping without the quotes; per character, so pieces concatenate to the whole's escape."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
