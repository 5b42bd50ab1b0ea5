"""The agent quick start (docs/examples/agent_quickstart.py): a plain openai tool loop whose tools are real Python
functions. Its tools are checked against the training catalog here, and it runs as written against the default
server: the shipped model, trained on tool calls in GLM-5's format, calls each tool and answers from its result."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.service_fixtures import ServerProcess
from tests.test_default_model import DEFAULT

EXAMPLE = DEFAULT.parents[2] / "docs" / "examples" / "agent_quickstart.py"


def load_example():
    spec = importlib.util.spec_from_file_location("agent_quickstart", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_offers_the_training_tools_and_runs_them_as_a_model_calls_them():
    """Its tools are the training catalog's own (same names, docstring descriptions and schemas), and its
    functions take the call's arguments as keywords (math.gcd and str.upper themselves take none)."""
    from model.tool_catalog import BY_NAME

    example = load_example()
    for tool in example.TOOLS:
        name = tool["function"]["name"]
        catalog = BY_NAME[name].schema()
        assert tool["function"]["description"] == catalog["function"]["description"]
        assert tool["function"]["parameters"] == catalog["function"]["parameters"]
        args = {"gcd": {"a": 84, "b": 36}, "is_leap_year": {"year": 1900}, "upper": {"text": "silver river"}}[name]
        assert example.as_text(example.FUNCTIONS[name](**args)) == BY_NAME[name].run(args)


@pytest.mark.slow
@pytest.mark.server
def test_the_quickstart_agent_calls_each_tool_and_answers(tmp_path, capsys):
    example = load_example()
    with ServerProcess([], tmp_path / "server.log") as server:
        example.main(["--base-url", server.base_url + "/v1"])
    out = capsys.readouterr().out
    print(out)
    assert 'tool call: gcd({"a": 84, "b": 36}) -> 12' in out
    assert 'tool call: is_leap_year({"year": 1900}) -> false' in out
    assert 'tool call: upper({"text": "silver river"}) -> SILVER RIVER' in out
    answers = re.findall(r"^assistant: (.*)$", out, re.M)
    assert len(answers) == 3 and "12" in answers[0] and "SILVER RIVER" in answers[2]
    assert "false" in answers[1].lower() or "not" in answers[1].lower()
