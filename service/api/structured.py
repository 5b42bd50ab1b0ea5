"""What a chat/completions request asks the decoder to obey, as one xgrammar structural tag (JSON text).

- `response_format` json_object / json_schema, and vLLM's `structured_outputs` json / regex / choice / grammar;
- `tool_choice` "required" or a named function: one or more GLM tool calls whose arguments follow each tool's
  parameter schema (GLM's `<arg_key>`/`<arg_value>` layout), then the end of the answer;
- `tool_choice` "none" while the tool parser is on: free text that never opens a `<tool_call>`.
When the prompt opens a `<think>` block, any reasoning up to `</think>` comes first and the grammar starts after
it. The spec is checked here, so a bad schema, regex or grammar is the client's 400 quoting the compiler.
"""

from __future__ import annotations

import json
from typing import Any

from service.api.errors import bad_request
from service.api.reasoning_parser import THINK_CLOSE, THINK_OPEN
from service.api.tool_parser import KEY_CLOSE, KEY_OPEN, TOOL_CLOSE, TOOL_OPEN, VALUE_CLOSE, VALUE_OPEN

# Runs of whitespace a constrained answer may hold: weak models otherwise loop on newlines inside a JSON object.
MAX_WHITESPACE = 2
_REASONING_EXCLUDES = [THINK_OPEN, TOOL_OPEN, TOOL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE]


def _json(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}


def _unambiguous_values(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each length-bounded string argument rewritten as a pattern that keeps the bounds and has no `<`.

    Each argument's value is raw text up to `</arg_value>`. xgrammar keeps that tag out of an unbounded string,
    but a string with minLength/maxLength becomes any characters (up to the bound), the tag included: then
    `<arg_value>10</arg_value><arg_key>b` still matches as one value, while every parser ends the value at the
    first `</arg_value>` (and with the tag a single token, a small model does write that). xgrammar takes no
    lookahead and drops the length bounds of a string that has a pattern, so the bounded pattern is `[^<]{m,n}`:
    such a string cannot hold `<` in a forced call. Its first and last characters are not whitespace either:
    the grammar lets layout whitespace stand around a value and the parser drops it, so a value that began or
    ended with whitespace would come back shorter than the grammar counted it (below its minLength)."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return schema
    fixed = {}
    for name, prop in props.items():
        bounded = isinstance(prop, dict) and prop.get("type") == "string" and (
            "maxLength" in prop or "minLength" in prop) and not {"pattern", "format", "enum", "const"} & prop.keys()
        lo, hi = (prop.get("minLength", 0), prop.get("maxLength")) if bounded else (0, None)
        if bounded and _count(lo) and (hi is None or _count(hi) and lo <= hi):  # else xgrammar judges the schema
            prop = {k: v for k, v in prop.items() if k not in ("minLength", "maxLength")}
            prop["pattern"] = _trimmed_pattern(lo, hi)
        elif isinstance(prop, dict) and prop.get("type") != "string":
            prop = _no_markup(prop)
        fixed[name] = prop
    defs = {k: {n: _no_markup(d) for n, d in v.items()} if isinstance(v, dict) else v
            for k, v in schema.items() if k in ("$defs", "definitions")}
    return {**schema, "properties": fixed, **defs}


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")


def _no_markup(schema: Any) -> Any:
    """`schema` with every JSON string inside it kept free of `<`. A value that is not a plain string (an array,
    an object, `anyOf` with null) is JSON, and a JSON string in it may hold any text: `["x</arg_value></tool_call>`
    kept the grammar inside the string while the parser had already ended the value and the call (a model whose
    tags are single tokens wrote that, with `"languages": ["...`). xgrammar keeps a patterned JSON string to plain
    characters (no quote, backslash or control character), so its output stays valid JSON."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    kind = schema.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if is_string and not {"pattern", "format", "enum", "const"} & schema.keys():
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if _count(lo) and (hi is None or _count(hi) and lo <= hi):  # else xgrammar judges the schema
            out = {k: v for k, v in out.items() if k not in ("minLength", "maxLength")}
            out["pattern"] = f"^[^<]{{{lo},{'' if hi is None else hi}}}$" if lo or hi is not None else "^[^<]*$"
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {k: _no_markup(v) for k, v in schema[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [_no_markup(v) for v in schema[key]]
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            out[key] = _no_markup(schema[key])
    return out


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _trimmed_pattern(lo: int, hi: int | None) -> str:
    """Strings of lo..hi characters (hi None: no bound), none of them `<`, neither end whitespace."""
    edge, inner = "[^<\\s]", "[^<]"
    if hi == 0:
        return "^$"
    if hi == 1:
        return f"^{edge}{'' if lo else '?'}$"
    upper = "" if hi is None else hi - 2
    two_or_more = f"{edge}{inner}{{{max(lo - 2, 0)},{upper}}}{edge}"
    if lo >= 2:
        return f"^{two_or_more}$"
    return f"^({edge}|{two_or_more}){'' if lo else '?'}$"


def _tool_call(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters")
    schema = params if isinstance(params, dict) and params else {"type": "object", "properties": {}}
    return {"type": "tag", "begin": f"{TOOL_OPEN}{fn['name']}",
            "content": {**_json(_unambiguous_values(schema)), "style": "glm_xml"}, "end": TOOL_CLOSE}


def tool_call_format(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """One call (or, with parallel calls, one or more back to back) to any of `tools`, nothing else."""
    return {"type": "tags_with_separator", "tags": [_tool_call(t) for t in tools], "separator": "",
            "at_least_one": True, "stop_after_first": not parallel}


def no_tool_call_format() -> dict[str, Any]:
    return {"type": "any_text", "excludes": [TOOL_OPEN]}


def response_format_spec(response_format: dict[str, Any] | None,
                         structured_outputs: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """The format asked for by `response_format` or vLLM's `structured_outputs` (None: free text), and the
    request field to blame in a 400."""
    so = structured_outputs or {}
    # Identity, not equality: 0 == False, and a 0 given for a regex must be the client's 400, not "not given".
    given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
             if so.get(k) is not None and so.get(k) is not False]
    if len(given) > 1:
        raise bad_request(f"structured_outputs: give only one of json, regex, choice, grammar; got {given}.",
                          param="structured_outputs")
    if given and response_format and response_format.get("type") != "text":
        raise bad_request("give either response_format or structured_outputs, not both.", param="structured_outputs")
    if given:
        kind, value = given[0], so[given[0]]
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise bad_request(f"structured_outputs.json is not valid JSON: {e}",
                                      param="structured_outputs.json") from None
            if not isinstance(value, dict | bool):
                raise bad_request("structured_outputs.json must be a JSON schema.", param="structured_outputs.json")
            return _json(value), "structured_outputs.json"
        if kind == "json_object":
            if value is not True:
                raise bad_request("structured_outputs.json_object must be a boolean.",
                                  param="structured_outputs.json_object")
            return _json({"type": "object"}), "structured_outputs.json_object"
        if kind == "regex":
            if not isinstance(value, str):
                raise bad_request("structured_outputs.regex must be a string.", param="structured_outputs.regex")
            return {"type": "regex", "pattern": value}, "structured_outputs.regex"
        if kind == "choice":
            if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
                raise bad_request("structured_outputs.choice must be a non-empty list of strings.",
                                  param="structured_outputs.choice")
            return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in value]}, \
                "structured_outputs.choice"
        if not isinstance(value, str) or not value.strip():
            raise bad_request("structured_outputs.grammar must be a non-empty string.",
                              param="structured_outputs.grammar")
        syntax = "ebnf" if "::=" in value else "lark"  # vLLM accepts both
        return {"type": "grammar", "grammar": value, "syntax": syntax}, "structured_outputs.grammar"
    if response_format is None:
        return None, "response_format"
    kind = response_format.get("type")  # {} too is a 400 below: OpenAI requires the type
    if kind == "text":
        return None, "response_format"
    if kind == "json_object":
        return _json({"type": "object"}), "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a 'schema'.",
                              param="response_format.json_schema")
        if "name" in spec and not isinstance(spec["name"], str):
            raise bad_request("response_format.json_schema.name must be a string.",
                              param="response_format.json_schema.name")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise bad_request("response_format.json_schema.strict must be a boolean.",
                              param="response_format.json_schema.strict")
        schema = spec.get("schema", {"type": "object"})  # OpenAI allows a name alone: any object
        if not isinstance(schema, dict | bool):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object.",
                              param="response_format.json_schema.schema")
        return _json(schema), "response_format.json_schema.schema"
    raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                      param="response_format.type")


def build_spec(fmt: dict[str, Any] | None, reasoning: bool) -> str | None:
    """The structural tag (JSON text) for `fmt`, after a reasoning block when the prompt opened one."""
    if fmt is None:
        return None
    if reasoning:
        think = {"type": "tag", "begin": "", "content": {"type": "any_text", "excludes": _REASONING_EXCLUDES},
                 "end": THINK_CLOSE}
        fmt = {"type": "sequence", "elements": [think, fmt]}
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False, sort_keys=True)


def check(spec: str, param: str) -> None:
    """400 quoting the grammar compiler when `spec` does not compile (call off the event loop)."""
    from service.engine.structured import check_spec

    try:
        check_spec(spec)
    except ValueError as e:
        raise bad_request(f"Invalid {param}: {e}", param=param, code="invalid_grammar") from None
