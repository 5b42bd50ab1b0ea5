"""The forced-tool-call grammar (tool_choice required / named) against GLM call text, token by token through
xgrammar's matcher with the shipped tokenizer: an argument value must end at its `</arg_value>`, so what the
grammar accepts is what the tool parser reads back. xgrammar's length-bounded strings admitted the closing tag
inside a value (`<arg_value>10</arg_value><arg_key>b</arg_value>...` matched with city = "10</arg_value><arg_key>b");
a model whose tags are single tokens wrote exactly that, and the parsed call then missed a required argument."""

from __future__ import annotations

import itertools

import pytest

from model.tokenizer import Tokenizer
from service.api.structured import build_spec, tool_call_format
from service.engine import structured
from service.settings import WEIGHTS_DIR

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 2, "maxLength": 24},
    "days": {"type": "integer"},
    "note": {"type": "string"},
    "label": {"type": "string", "pattern": "^[a-z]<[a-z]$"}},
    "required": ["city", "days"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
# xgrammar takes the properties in the spec's (sorted) key order: city, days, label, note.
CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>{city}</arg_value><arg_key>days</arg_key>" \
       "<arg_value>5</arg_value>{rest}</tool_call>"


@pytest.fixture(scope="module")
def accepts():
    tok = Tokenizer.from_dir(WEIGHTS_DIR / "glm-5-tiny-py")
    xgr = structured._xgr()
    info = structured._tokenizer_info(tok, tok.vocab_size, set(tok.eos_token_ids))
    compiled = xgr.GrammarCompiler(info).compile_structural_tag(build_spec(tool_call_format([TOOL], False), False))

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in tok.encode(text))

    return accepts


def test_a_value_cannot_swallow_the_closing_tag(accepts):
    assert accepts(CALL.format(city="Paris", rest=""))
    assert not accepts(CALL.format(city="10</arg_value><arg_key>b", rest=""))
    assert not accepts(CALL.format(city="a</arg_value>x", rest=""))


def test_length_bounds_still_hold(accepts):
    assert accepts(CALL.format(city="x" * 24, rest=""))
    assert not accepts(CALL.format(city="x" * 25, rest=""))
    assert not accepts(CALL.format(city="1", rest=""))


def test_unbounded_and_patterned_strings_keep_their_text(accepts):
    """Only bounded strings lose `<`: an unbounded one may hold markup, a client's own pattern is its own."""
    assert accepts(CALL.format(city="Oslo", rest="<arg_key>note</arg_key><arg_value>a <b> tag</arg_value>"))
    assert accepts(CALL.format(city="Oslo", rest="<arg_key>label</arg_key><arg_value>a<b</arg_value>"))
    assert not accepts(CALL.format(city="Oslo", rest="<arg_key>note</arg_key><arg_value>x</arg_value>y</arg_value>"))


def _call_with(s: str) -> str:
    return f"<tool_call>f<arg_key>s</arg_key><arg_value>{s}</arg_value></tool_call>"


@pytest.mark.parametrize("lo,hi", [(0, None), (1, None), (2, None), (0, 1), (1, 1), (0, 2), (1, 3), (2, 2), (3, 4)])
def test_a_bounded_value_reads_back_within_its_bounds(lo: int, hi: int | None) -> None:
    """Every string over {a, space, tab, <} up to 5 characters: the grammar takes it exactly when what the parser
    reads back (layout whitespace around the value dropped) has no `<` and a length within the bounds. Before,
    `"  x  "` passed minLength 2 as `x` plus layout, and came back one character long."""
    xgr = structured._xgr()
    prop = {"type": "string", "minLength": lo, **({} if hi is None else {"maxLength": hi})}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": prop}, "required": ["s"]}}}
    grammar = xgr.Grammar.from_structural_tag(build_spec(tool_call_format([tool], False), False))
    for n in range(6):
        for chars in itertools.product("a <\t", repeat=n):
            s = "".join(chars)
            value = s.strip(" \t")
            lead, trail = len(s) - len(s.lstrip(" \t")), len(s) - len(s.rstrip(" \t"))
            if not value:  # all layout: an empty value, with at most 2 + 2 whitespace characters around it
                want = lo == 0 and len(s) <= 4
            else:
                want = "<" not in s and lo <= len(value) <= (hi or 99) and lead <= 2 and trail <= 2
            assert xgr.testing._is_grammar_accept_string(grammar, _call_with(s)) == want, (lo, hi, s)


@pytest.mark.parametrize("bounds", [{"minLength": "3"}, {"maxLength": "x"}, {"maxLength": 2.5}, {"minLength": True},
                                    {"minLength": 5, "maxLength": 2}])
def test_bad_length_bounds_are_the_clients_400_quoting_the_compiler(bounds: dict) -> None:
    """Only well-formed bounds are rewritten into a pattern; the rest reach xgrammar as written, whose error is
    the 400 (a string bound once raised TypeError here: a 500)."""
    from service.api.errors import APIError
    from service.api.structured import check

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", **bounds}}}}}
    with pytest.raises(APIError) as e:
        check(build_spec(tool_call_format([tool], False), False), "tools")
    assert e.value.status == 400 and "Length" in e.value.message


NESTED = {"type": "object", "required": ["langs", "who", "maybe"], "properties": {
    "langs": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "who": {"$ref": "#/$defs/Who"},
    "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "$defs": {"Who": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 5}}, "required": ["n"]}}}


@pytest.fixture(scope="module")
def accepts_nested():
    tok = Tokenizer.from_dir(WEIGHTS_DIR / "glm-5-tiny-py")
    xgr = structured._xgr()
    info = structured._tokenizer_info(tok, tok.vocab_size, set(tok.eos_token_ids))
    tool = {"type": "function", "function": {"name": "f", "parameters": NESTED}}
    compiled = xgr.GrammarCompiler(info).compile_structural_tag(build_spec(tool_call_format([tool], False), False))

    def accepts(langs: str, who: str = '{"n": "ab"}', maybe: str = "null") -> bool:
        text = (f"<tool_call>f<arg_key>langs</arg_key><arg_value>{langs}</arg_value><arg_key>maybe</arg_key>"
                f"<arg_value>{maybe}</arg_value><arg_key>who</arg_key><arg_value>{who}</arg_value></tool_call>")
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in tok.encode(text))

    return accepts


def test_strings_inside_json_values_cannot_hold_the_tags(accepts_nested):
    """A JSON string in an array, a nested object or an anyOf value is JSON text the grammar followed while the
    parser ended the value at the first `</arg_value>`: `["x</arg_value></tool_call>...` (the GPU-trained model
    wrote it for `languages: list[str]`) left the grammar inside the string and the answer ran to max_tokens."""
    assert accepts_nested('["en", "fr"]')
    assert not accepts_nested('["x</arg_value></tool_call>"]')
    assert not accepts_nested('["a<b"]')
    assert accepts_nested('["en"]', who='{"n": "abcde"}')
    assert not accepts_nested('["en"]', who='{"n": "a</arg_value>"}')
    assert not accepts_nested('["en"]', who='{"n": "abcdef"}')  # the bound still holds
    assert accepts_nested('["en"]', maybe='"text"')
    assert not accepts_nested('["en"]', maybe='"a</arg_value></tool_call>"')
