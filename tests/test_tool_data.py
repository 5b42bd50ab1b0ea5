"""Tool-use data: calls in GLM-5's format with the real functions' real results, thinking derived from the
signature and docstring, a held-out split with no overlap, and the parser the evaluation reads calls with."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from random import Random

import pytest

from model.build_tokenizer import ENDOFTEXT, GLM_CHAT_TEMPLATE
from model.tokenizer import ChatTemplate
from model.tool_catalog import BY_NAME, HELDOUT_TOOLS, TOOLS, describe
from model.tool_data import (
    ALIAS_RATE,
    PARAM_RENAME_RATE,
    POOL_ALIAS_SHARE,
    TRAIN_TOOLS,
    ToolDocs,
    alias_names,
    eval_prompts,
    heldout_phrasing,
    parse_tool_calls,
    schema_valid,
)

TEMPLATE = ChatTemplate(GLM_CHAT_TEMPLATE)
TURN = re.compile(r"<\|(user|assistant|observation)\|>(.*?)(?=<\|(?:user|assistant|observation)\|>|$)", re.S)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return list(ToolDocs(TEMPLATE, ENDOFTEXT, seed=0).tool_docs(400))


def shown(d: dict):
    """The document's tool as the document shows it: its alias, when it has one, and its parameters' names in
    the tool list (renamed in some aliased documents)."""
    tool = BY_NAME[d["source"].split(":")[1]]
    schema = next(t for t in offered_in(d["text"]) if t["function"]["name"] == d["called"])
    keys = list(schema["function"]["parameters"]["properties"])
    return replace(tool, name=d["called"], params=tuple(replace(p, name=k) for p, k in zip(tool.params, keys,
                                                                                               strict=True)))


def offered_in(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")]


def turns(text: str) -> list[tuple[str, str]]:
    """The turns after the system turn (whose instructions show a sample call)."""
    return TURN.findall("<|user|>" + text.removesuffix(ENDOFTEXT).split("</tool_call><|user|>", 1)[-1])


def test_calls_are_glm5_format_and_observations_are_the_real_results(docs: list[dict]) -> None:
    assert len({d["source"].split(":")[1] for d in docs}) == len(TRAIN_TOOLS)  # every training tool appears
    for d in docs:
        name, tool = d["called"], shown(d)
        (u, ask), (a1, first), (o, obs), (a2, final) = turns(d["text"])
        assert (u, a1, o, a2) == ("user", "assistant", "observation", "assistant")
        offered = offered_in(d["text"])
        assert tool.schema() in offered and 1 <= len(offered) <= 4
        assert re.fullmatch(r"<think>.*</think><tool_call>[a-z_0-9]+(<arg_key>[a-z0-9_]+</arg_key>"
                            r"<arg_value>.*?</arg_value>)+</tool_call>", first, re.S), first
        [call] = parse_tool_calls(first, offered)
        assert call["name"] == name and schema_valid(call["arguments"], tool.schema())
        result = tool.run(call["arguments"])  # run the function again on what the text says was asked (the
        # shown tool's parameters are the real function's, in order, under the names the call uses)
        assert obs == f"<tool_response>{result}</tool_response>"
        assert str(next(iter(call["arguments"].values()))) in ask or name in ("html_escape",)
        assert result in final.split("</think>")[1]


def test_some_documents_call_their_tools_by_an_alias(docs: list[dict]) -> None:
    """Under an alias the right name is in the tool list only: every offered tool is renamed, to a name no real
    tool has, and the call uses the alias of the tool the request is about."""
    real = {t.name for t in TOOLS}
    aliased = [d for d in docs if d["called"] not in real]
    assert abs(len(aliased) / len(docs) - ALIAS_RATE) < 0.1
    for d in docs:
        names = [t["function"]["name"] for t in offered_in(d["text"])]
        assert len(set(names)) == len(names) and d["called"] in names
        assert all(n not in real for n in names) if d in aliased else set(names) <= real
    assert any("_" + d["source"].split(":")[1] in d["called"] or d["source"].split(":")[1] + "_" in d["called"]
               for d in aliased)  # some keep the real name inside, most are two unrelated words
    assert sum(d["source"].split(":")[1] not in d["called"] for d in aliased) > len(aliased) / 2
    real_keys = {p.name for t in TOOLS for p in t.params}
    renamed_keys = [d for d in aliased if not set(shown(d).schema()["function"]["parameters"]["properties"])
                    <= real_keys]
    assert abs(len(renamed_keys) / len(aliased) - PARAM_RENAME_RATE) < 0.15  # most aliased tools rename keys
    for d in renamed_keys:  # and then to names no real tool has (a held-out tool's `y1` included)
        assert not set(shown(d).schema()["function"]["parameters"]["properties"]) & real_keys


def test_real_function_results() -> None:
    assert BY_NAME["gcd"].run({"a": 12, "b": 18}) == "6"
    assert BY_NAME["hypot"].run({"x": 3.0, "y": 4.0}) == "5.0"
    assert BY_NAME["split_extension"].run({"p": "/a/b.txt"}) == '["/a/b", ".txt"]'
    assert BY_NAME["is_leap_year"].run({"year": 2000}) == "true"
    assert BY_NAME["upper"].run({"text": "hi there"}) == "HI THERE"
    assert BY_NAME["log"].run({"x": 8.0, "base": 2.0}) == repr(round(math.log(8.0, 2.0), 6))


def test_descriptions_come_from_the_docstrings() -> None:
    for tool in TOOLS:
        doc = " ".join((tool.fn.__doc__ or "").split())
        assert tool.description and tool.description.rstrip(".") in doc, tool.name
    assert describe("hypot(*coordinates) -> value\n\nMultidimensional distance. More.") == "Multidimensional distance."
    assert describe("log(x, [base=math.e])\nReturn the logarithm.\n\nMore.") == "Return the logarithm."


def test_thinking_on_and_off(docs: list[dict]) -> None:
    on = [d for d in docs if d["text"][: d["prompt_chars"]].endswith("<think>")]
    off = [d for d in docs if d["text"][: d["prompt_chars"]].endswith("<think></think>")]
    assert len(on) + len(off) == len(docs) and 0.3 < len(on) / len(docs) < 0.7
    for d in on:
        tool = shown(d)
        plan = d["text"][d["prompt_chars"]:].split("</think>")[0]
        assert tool.signature() in plan and tool.description in plan  # derived from signature and docstring
    for d in off:
        assert "<think></think><tool_call>" in d["text"] and d["text"].count("<think></think>") == 2


def test_heldout_tools_and_phrasings_never_trained(docs: list[dict]) -> None:
    assert HELDOUT_TOOLS <= set(BY_NAME) and 5 <= len(HELDOUT_TOOLS) < len(TOOLS) / 4
    for d in docs:
        _, name, phrasing = d["source"].split(":")
        assert name not in HELDOUT_TOOLS and int(phrasing) != heldout_phrasing(BY_NAME[name])
        calls = parse_tool_calls(d["text"], [t.schema() for t in TOOLS])
        assert not {c["name"] for c in calls} & HELDOUT_TOOLS
        offered = d["text"].split("</tools>")[0]
        assert not any(f'"name": "{h}"' in offered for h in HELDOUT_TOOLS)  # not even as distractors
    prompts = list(eval_prompts(["Write a function."], per_phrasing=2))
    splits = {p["split"] for p in prompts}
    assert splits == {"heldout_tool", "heldout_phrasing", "no_tool"}
    trained = {(d["source"].split(":")[1], int(d["source"].split(":")[2])) for d in docs}
    for p in prompts:
        if p["split"] == "no_tool":
            assert p["tool"] is None and p["tools"]
            continue
        tool = BY_NAME[p["tool"]]
        assert (p["tool"], p["phrasing"]) not in trained
        assert (p["tool"] in HELDOUT_TOOLS) == (p["split"] == "heldout_tool")
        assert tool.schema() in p["tools"] and schema_valid(p["arguments"], tool.schema())
        assert p["messages"] == [{"role": "user", "content": tool.asks[p["phrasing"]].format(**p["arguments"])}]


def test_deterministic() -> None:
    a = list(ToolDocs(TEMPLATE, ENDOFTEXT, seed=3).tool_docs(30))
    assert a == list(ToolDocs(TEMPLATE, ENDOFTEXT, seed=3).tool_docs(30))
    assert a != list(ToolDocs(TEMPLATE, ENDOFTEXT, seed=4).tool_docs(30))
    assert list(eval_prompts([], seed=2)) == list(eval_prompts([], seed=2))


def test_parser_and_schema_check() -> None:
    tools = [BY_NAME["replace"].schema(), BY_NAME["gcd"].schema()]
    text = ("plan</think>sure<tool_call>gcd\n<arg_key>a</arg_key>\n<arg_value>4</arg_value><arg_key>b</arg_key>"
            "<arg_value>6</arg_value></tool_call><tool_call>replace<arg_key>text</arg_key><arg_value>12</arg_value>"
            "<arg_key>old</arg_key><arg_value>1</arg_value><arg_key>new</arg_key><arg_value>x</arg_value></tool_call>")
    calls = parse_tool_calls(text, tools)
    assert calls == [{"name": "gcd", "arguments": {"a": 4, "b": 6}},
                     {"name": "replace", "arguments": {"text": "12", "old": "1", "new": "x"}}]  # strings stay raw
    assert schema_valid(calls[0]["arguments"], tools[1]) and schema_valid(calls[1]["arguments"], tools[0])
    assert not schema_valid({"a": 4}, tools[1]) and not schema_valid({"a": 4, "b": "6"}, tools[1])
    assert not schema_valid({"a": 4, "b": 6, "c": 1}, tools[1]) and not schema_valid({"a": True, "b": 6}, tools[1])
    assert parse_tool_calls("<tool_call>gcd<arg_key>a</arg_key>", tools) == []  # unfinished: no call


def test_aliases_from_a_pool_of_identifiers_are_never_a_real_tools_name() -> None:
    pool = ("radians", *(f"name_{i}" for i in range(40)))  # radians is a (held-out) tool's name
    drawn = [a for i in range(300) for a in alias_names(Random(i), TRAIN_TOOLS[:3], pool).values()]
    assert "radians" not in drawn and not {t.name for t in TRAIN_TOOLS} & set(drawn)
    assert abs(sum(a in pool for a in drawn) / len(drawn) - POOL_ALIAS_SHARE) < 0.1
    assert sum(a in pool for a in alias_names(Random(0), TRAIN_TOOLS[:3]).values()) == 0  # no pool: words, affixes
