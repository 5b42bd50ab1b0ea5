"""The forced-tool-call grammar (tool_choice required / named) against GLM call text, token by token through
xgrammar's matcher with the shipped tokenizer: an argument value must end at its `</arg_value>`, so what the
grammar accepts is what the tool parser reads back. xgrammar's length-bounded strings admitted the closing tag
inside a value (`<arg_value>10</arg_value><arg_key>b</arg_value>...` matched with city = "10</arg_value><arg_key>b");
a model whose tags are single tokens wrote exactly that, and the parsed call then missed a required argument."""

from __future__ import annotations

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
