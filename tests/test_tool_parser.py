"""GLM tool-call and reasoning parsing on real GLM-4.5 / 4.7 / GLM-5 output strings, streamed and not.

The reference outputs are the shapes these models write (as published in vLLM's and SGLang's parser tests and
in bug reports against them): newline-separated GLM-4.5 calls, compact GLM-4.7/GLM-5 calls, content before a
call, parallel calls, zero-argument calls. The streaming property: for every way of cutting an output into
chunks (every single cut point, every character alone, and a few hundred random cuttings), the joined deltas
equal the one-shot parse and no tag text reaches content or reasoning.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from service.api.reasoning_parser import ChoiceParser, GlmReasoningParser, prompt_opens_reasoning
from service.api.tool_parser import TOOL_TAGS, GlmToolParser, admitted_types, convert_value

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"},
                                     "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {
        "query": {"type": "string"},
        "site": {"anyOf": [{"type": "string"}, {"type": "null"}]},  # Optional[str]
        "filters": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
        "limit": {"type": ["integer", "null"]}, "exact": {"type": "boolean"}, "code": {"type": "string"}}}}}
NOW = {"type": "function", "function": {"name": "get_current_time", "parameters": {"type": "object",
                                                                                  "properties": {}}}}
TOOLS = [WEATHER, SEARCH, NOW]

# (model output, expected content, expected [(name, arguments dict)])
CASES = [
    # GLM-4.5/4.6: newline after the name and between the parts
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n"
     "<arg_value>2024-12-25</arg_value>\n</tool_call>", None,
     [("get_weather", {"city": "Beijing", "date": "2024-12-25"})]),
    ("Let me search for that.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
     "</tool_call>", "Let me search for that.", [("get_weather", {"city": "Beijing"})]),
    # indented, as vLLM's GLM-4.5 tests have it
    ("<tool_call>get_weather\n    <arg_key>city</arg_key>\n    <arg_value>Dallas</arg_value>\n    "
     "<arg_key>unit</arg_key>\n    <arg_value>f</arg_value>\n    </tool_call>", None,
     [("get_weather", {"city": "Dallas", "unit": "f"})]),
    # GLM-4.7 / GLM-5: compact
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Seattle</arg_value><arg_key>days</arg_key>"
     "<arg_value>3</arg_value></tool_call>", None, [("get_weather", {"city": "Seattle", "days": 3})]),
    # parallel calls
    ("<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>rust tutorials</arg_value>\n</tool_call>\n"
     "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Orlando</arg_value>\n</tool_call>", None,
     [("search", {"query": "rust tutorials"}), ("get_weather", {"city": "Orlando"})]),
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call><tool_call>get_weather"
     "<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>", None,
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    # zero arguments, both layouts
    ("<tool_call>get_current_time\n</tool_call>", None, [("get_current_time", {})]),
    ("<tool_call>get_current_time</tool_call>", None, [("get_current_time", {})]),
    # non-ASCII content and values (GLM answers in Chinese as often as not)
    ("我来帮您查询北京的天气。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
     "</tool_call>", "我来帮您查询北京的天气。", [("get_weather", {"city": "北京"})]),
    # a numeric-looking and a boolean-looking string for string parameters stay strings
    ("<tool_call>search<arg_key>query</arg_key><arg_value>true</arg_value><arg_key>code</arg_key>"
     "<arg_value>007</arg_value></tool_call>", None, [("search", {"query": "true", "code": "007"})]),
    # Optional[str] (anyOf string/null): text stays text, null is null, a number-looking value stays a string
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>site</arg_key>"
     "<arg_value>docs.python.org</arg_value></tool_call>", None,
     [("search", {"query": "x", "site": "docs.python.org"})]),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>site</arg_key>"
     "<arg_value>null</arg_value><arg_key>limit</arg_key><arg_value>10</arg_value></tool_call>", None,
     [("search", {"query": "x", "site": None, "limit": 10})]),
    ("<tool_call>search<arg_key>query</arg_key><arg_value>x</arg_value><arg_key>site</arg_key>"
     "<arg_value>123</arg_value></tool_call>", None, [("search", {"query": "x", "site": "123"})]),
    # objects and arrays, JSON or Python literals (GLM writes both)
    ('<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>q</arg_value>\n<arg_key>filters</arg_key>\n'
     '<arg_value>{"lang": "en", "year": 2024}</arg_value>\n<arg_key>tags</arg_key>\n'
     "<arg_value>['a', 'b']</arg_value>\n<arg_key>exact</arg_key>\n<arg_value>True</arg_value>\n</tool_call>", None,
     [("search", {"query": "q", "filters": {"lang": "en", "year": 2024}, "tags": ["a", "b"], "exact": True})]),
    # text after the call is kept as content; text between calls too
    ("I will help you get the weather info.\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
     "<arg_value>Beijing</arg_value>\n</tool_call>\n\nmeanwhile, Shanghai.\n\n<tool_call>get_weather\n"
     "<arg_key>city</arg_key>\n<arg_value>Shanghai</arg_value>\n</tool_call>",
     "I will help you get the weather info.\n\nmeanwhile, Shanghai.",
     [("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})]),
    # a string value holding markup-like text and JSON specials
    ('<tool_call>search<arg_key>query</arg_key><arg_value>a "quoted" <b>tag</b>\n\\path</arg_value></tool_call>',
     None, [("search", {"query": 'a "quoted" <b>tag</b>\n\\path'})]),
    # whitespace around a value is layout (GLM-4.5 style, and what the grammar allows); inside it is kept
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>\n  New York \n</arg_value>\n<arg_key>days"
     "</arg_key><arg_value> 2\n</arg_value></tool_call>", None, [("get_weather", {"city": "New York", "days": 2})]),
    # no call at all: content unchanged, trailing whitespace included
    ("Just text with a < sign and <tool and </tool_call without a call.\n", "Just text with a < sign and <tool "
     "and </tool_call without a call.\n", []),
]


def _ids() -> itertools.count:
    return itertools.count()


def _parser() -> GlmToolParser:
    counter = _ids()
    return GlmToolParser(TOOLS, make_id=lambda: f"call_{next(counter)}")


def run(chunks: list[str]) -> tuple[str | None, list[tuple[str, str, str]], list]:
    """Feed chunks; return (content or None, [(id, name, arguments)], the raw deltas)."""
    p = _parser()
    deltas = [p.feed(c) for c in chunks] + [p.finish()]
    content = "".join(d.content for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for c in d.calls:
            if c.id is not None:
                assert c.index not in calls, "a call's header comes once"
                calls[c.index] = [c.id, c.name or "", ""]
            calls[c.index][2] += c.arguments
    return (content or None), [tuple(calls[i]) for i in sorted(calls)], deltas


@pytest.mark.parametrize("text,content,expected", CASES)
def test_parse_whole(text: str, content: str | None, expected: list) -> None:
    got_content, calls, _ = run([text])
    assert got_content == content
    assert [(name, json.loads(args)) for _, name, args in calls] == expected
    for _, _, args in calls:
        assert args == json.dumps(json.loads(args), ensure_ascii=False)  # canonical, non-ASCII kept


def _cuttings(text: str, rng: random.Random) -> list[list[str]]:
    cuts = [[text[:i], text[i:]] for i in range(1, len(text))]  # every single cut point
    cuts.append(list(text))  # every character its own chunk
    for _ in range(200):
        points = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        cuts.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return cuts


@pytest.mark.parametrize("text,content,expected", CASES)
def test_streaming_equals_whole_for_every_cutting(text: str, content: str | None, expected: list) -> None:
    whole = run([text])[:2]
    rng = random.Random(len(text))
    for chunks in _cuttings(text, rng):
        got_content, calls, deltas = run(chunks)
        assert (got_content, calls) == whole, chunks
        for d in deltas:
            assert not any(tag in d.content for tag in TOOL_TAGS if expected), (chunks, d.content)
            for c in d.calls:
                if c.id is not None:
                    assert c.arguments == ""  # the header delta carries no arguments


def test_string_values_stream_before_the_value_ends() -> None:
    p = _parser()
    p.feed("<tool_call>search<arg_key>query</arg_key><arg_value>hello wor")
    d = p.feed("ld, more")
    assert "".join(c.arguments for c in d.calls) == "ld, more"


def test_unterminated_call_closes_at_the_end() -> None:
    _, calls, _ = run(["<tool_call>get_weather<arg_key>city</arg_key><arg_value>Ber"])
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"city": "Ber"})]
    _, calls, _ = run(["<tool_call>get_weather<arg_key>days</arg_key><arg_value>1"])
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"days": 1})]


def test_admitted_types_and_conversion() -> None:
    assert admitted_types({"type": "string"}) == {"string"}
    assert admitted_types({"anyOf": [{"type": "string"}, {"type": "null"}]}) == {"string", "null"}
    assert admitted_types({"enum": ["a", 1]}) == {"string", "number"}
    assert convert_value("1e999", frozenset({"number"})) == "1e999"  # not finite: stays text
    assert convert_value("(1, 2)", frozenset({"array"})) == [1, 2]
    assert convert_value("{1, 2}", frozenset({"array"})) == "{1, 2}"  # a set is not JSON
    assert convert_value(" 42 ", frozenset({"integer", "number"})) == 42


# -- reasoning ----------------------------------------------------------------------------------------------------
REASONING_CASES = [
    # (prompt opens <think>, output, reasoning, content, calls)
    (True, "The user wants weather.</think>It is sunny.", "The user wants weather.", "It is sunny.", 0),
    (True, "Need a tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
           "</tool_call>", "Need a tool.", "", 1),
    (True, "thinking then straight to a call<tool_call>get_current_time</tool_call>",
     "thinking then straight to a call", "", 1),
    (False, "<think>I want to get the weather.</think>\n\nI will help.", "I want to get the weather.",
     "\n\nI will help.", 0),
    (False, "No thinking here, a </think> in prose stays.", "", "No thinking here, a </think> in prose stays.", 0),
    (True, "never closed: all of it is reasoning", "never closed: all of it is reasoning", "", 0),
]


def _run_choice(open_think: bool, chunks: list[str]) -> tuple[str, str, int]:
    parser = ChoiceParser(GlmReasoningParser(open_think), _parser())
    outs = [parser.feed(c) for c in chunks] + [parser.finish()]
    for o in outs:
        assert "<think>" not in o.reasoning and "</think>" not in o.reasoning
        assert not any(t in o.reasoning for t in TOOL_TAGS)
    return "".join(o.reasoning for o in outs), "".join(o.content for o in outs), \
        len({c.index for o in outs for c in o.calls})


@pytest.mark.parametrize("open_think,text,reasoning,content,calls", REASONING_CASES)
def test_reasoning_split_for_every_cutting(open_think: bool, text: str, reasoning: str, content: str,
                                           calls: int) -> None:
    assert _run_choice(open_think, [text]) == (reasoning, content, calls)
    for chunks in _cuttings(text, random.Random(7)):
        assert _run_choice(open_think, chunks) == (reasoning, content, calls), chunks


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<|user|>\nhi<|assistant|>\n<think>")
    assert prompt_opens_reasoning("<|assistant|><think>\n")
    assert not prompt_opens_reasoning("<|assistant|><think></think>")
    assert not prompt_opens_reasoning("<|assistant|>\n")
    assert not prompt_opens_reasoning("<think>old</think><|user|>x<|assistant|>")
