"""Structured outputs on the shipped model, through the engine with the API's own spec builder: 20 JSON schemas
(nested objects, enums, arrays with bounds, optional fields, numbers), each greedy and sampled, all in one batch;
every output must parse and validate (jsonschema) and end with `stop`. Then a regex, a choice, an EBNF and a Lark
grammar, and the compiler's own words in the 400 for broken ones.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from service.api import structured
from service.api.errors import APIError
from service.engine.config import EngineConfig
from service.engine.engine import LLMEngine
from service.engine.sampling_params import SamplingParams
from service.settings import WEIGHTS_DIR

pytestmark = pytest.mark.slow


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 12}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = [
    _obj({"name": NAME}),
    _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"colour": {"enum": ["red", "green", "blue"]}}),
    _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "admin": {"type": "boolean"}})}),
    _obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}}),
    _obj({"digits": {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 4}}),
    _obj({"title": NAME, "rank": DIGIT}, required=["title"]),  # an optional field
    _obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"ok": {"type": "boolean"}, "note": {"anyOf": [NAME, {"type": "null"}]}}),
    _obj({"kind": {"const": "point"}, "x": DIGIT, "y": DIGIT}),
    _obj({"pairs": {"type": "array", "maxItems": 2, "items": _obj({"k": {"enum": ["a", "b"]}, "v": DIGIT})}}),
    _obj({"a": _obj({"b": _obj({"c": {"enum": [1, 2, 3]}})})}),
    {"anyOf": [_obj({"cat": NAME}), _obj({"dog": DIGIT})]},
    _obj({"code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}}),
    _obj({"day": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}}),
    _obj({"level": {"enum": [1, 2, 3, 5, 8]}}),
    _obj({"id": DIGIT, "name": NAME, "active": {"type": "boolean"}, "score": {"type": "integer", "minimum": -5,
                                                                              "maximum": 5}, "role": {"enum": ["x"]}}),
    _obj({"pair": {"type": "array", "prefixItems": [DIGIT, {"enum": ["a", "b"]}], "items": False, "minItems": 2}}),
    _obj({}),
    {"type": "array", "items": {"enum": ["up", "down"]}, "minItems": 1, "maxItems": 4},
]
assert len(SCHEMAS) == 20

REGEX = r"[A-Z][a-z]{2,5} [0-9]{1,3}"
CHOICES = ["yes", "no", "maybe"]
EBNF = 'root ::= "(" num ("+" num)? ")"\nnum ::= [0-9] | [1-9] [0-9]'
LARK = 'start: "call " NAME "()"\nNAME: /[a-z]{1,8}/'


@pytest.fixture(scope="module")
def engine():
    model = next(p.parent for p in WEIGHTS_DIR.glob("*/config.json"))
    return LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=64, kv_cache_tokens=32768,
                                              max_model_len=1024))


def _spec(**structured_outputs) -> str:
    fmt, _ = structured.response_format_spec(None, structured_outputs)
    spec = structured.build_spec(fmt, reasoning=False)
    structured.check(spec, "structured_outputs")
    return spec


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[str, str]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    texts: dict[str, str] = dict.fromkeys(requests, "")
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                texts[out.request_id] += o.text
                if o.finish_reason is not None:
                    reasons[out.request_id] = o.finish_reason
    return {rid: (texts[rid], reasons[rid]) for rid in requests}


def test_twenty_schemas_greedy_and_sampled_all_validate(engine):
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Reply in JSON."}]))
    requests = {}
    for i, schema in enumerate(SCHEMAS):
        fmt, _ = structured.response_format_spec({"type": "json_schema", "json_schema": {"name": f"s{i}",
                                                                                          "schema": schema}}, None)
        spec = structured.build_spec(fmt, reasoning=False)
        structured.check(spec, "response_format")
        requests[f"greedy-{i}"] = (prompt, SamplingParams(max_tokens=256, temperature=0.0, structured=spec))
        requests[f"sampled-{i}"] = (prompt, SamplingParams(max_tokens=256, temperature=1.0, seed=i, structured=spec))
    results = _run(engine, requests)
    for rid, (text, reason) in results.items():
        schema = SCHEMAS[int(rid.split("-")[1])]
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_grammars(engine):
    tok = engine.tokenizer
    prompt = tok.encode("def main():\n    ")
    cases = {"regex": _spec(regex=REGEX), "choice": _spec(choice=CHOICES), "ebnf": _spec(grammar=EBNF),
             "lark": _spec(grammar=LARK)}
    requests = {f"{k}-{t}": (prompt, SamplingParams(max_tokens=64, temperature=t, seed=1, structured=spec))
                for k, spec in cases.items() for t in (0.0, 1.0)}
    results = _run(engine, requests)
    for rid, (text, reason) in results.items():
        assert reason == "stop", (rid, text)
        kind = rid.split("-")[0]
        if kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES
        elif kind == "ebnf":
            assert re.fullmatch(r"\((\d|[1-9]\d)(\+(\d|[1-9]\d))?\)", text), text
        else:
            assert re.fullmatch(r"call [a-z]{1,8}\(\)", text), text


@pytest.mark.parametrize("so,words", [({"regex": "([a-"}, "Unclosed '['"),
                                      ({"grammar": "root ::= missing"}, 'Rule "missing" is not defined'),
                                      ({"json": {"type": "nonsense"}}, 'Unsupported type "nonsense"')])
def test_bad_specs_quote_the_compiler(so, words):
    fmt, param = structured.response_format_spec(None, so)
    with pytest.raises(APIError) as e:
        structured.check(structured.build_spec(fmt, reasoning=False), param)
    assert e.value.status == 400 and words in e.value.message
