"""The README's agent quick start (docs/examples/agent_quickstart.py), run as written against the shipped model:
every question gets a call to the right tool with the right arguments, and an answer that states the result."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from openai import OpenAI

from tests.service_fixtures import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.server]

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "agent_quickstart.py"
EXPECTED = [("gcd", '{"a": 84, "b": 36}', "12"), ("isleap", '{"year": 1900}', "false"),
            ("upper", '{"text": "silver river"}', "SILVER RIVER")]


def load_script():
    spec = importlib.util.spec_from_file_location("agent_quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_agent_calls_the_right_tools_and_answers(tmp_path, capsys):
    quickstart = load_script()
    assert len(quickstart.QUESTIONS) == len(EXPECTED)
    with ServerProcess([], tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as server:
        assert quickstart.main(["--base-url", server.base_url + "/v1"]) == 0
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        transcripts = [quickstart.ask(client, "glm-5-tiny-py", q) for q in quickstart.QUESTIONS]
    printed = capsys.readouterr().out
    for lines, (name, args, result) in zip(transcripts, EXPECTED, strict=True):
        assert "\n".join(lines) in printed  # main() printed the same transcripts (temperature 0)
        assert lines[1] == f"tool call: {name}({args}) -> {result}", lines
        answer = lines[2]
        assert answer.startswith("assistant: ") and re.search(re.escape(result), answer, re.I), lines
