"""The chat response shapes built from parsed output: non-streamed messages and stream deltas (joined, they give the
same message), finish_reason "tool_calls", content null before a call, parallel_tool_calls: false, dropped
reasoning, and the plan a request makes (which grammar, which parsers)."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.api.chat_agents import ChatPlan, delta, message, plan_chat, stream_finish_reason
from service.api.errors import APIError
from service.api.protocol import ChatCompletionRequest
from tests.test_tool_parser import TOOLS

OUTPUT = ("Checking.</think>Let me look.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
          "</tool_call><tool_call>get_current_time</tool_call>")


def _stream(plan: ChatPlan, text: str, size: int, reason: str) -> tuple[dict, str | None]:
    parser = plan.parser()
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    joined: dict = {"reasoning_content": "", "content": "", "tool_calls": {}}
    for i, piece in enumerate(pieces):
        d = delta(plan, parser, piece, i == len(pieces) - 1)
        joined["reasoning_content"] += d.get("reasoning_content", "")
        joined["content"] += d.get("content", "")
        for c in d.get("tool_calls", []):
            call = joined["tool_calls"].setdefault(c["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in c:
                assert call["id"] is None
                call["id"], call["name"] = c["id"], c["function"]["name"]
            call["arguments"] += c["function"]["arguments"]
    return joined, stream_finish_reason(parser, reason)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_stream_joined_equals_message(size: int) -> None:
    plan = ChatPlan(reasoning=True, in_reasoning=True, tools=TOOLS)
    msg, reason = message(plan, OUTPUT, "stop")
    assert reason == "tool_calls"
    assert msg["reasoning_content"] == msg["reasoning"] == "Checking."
    assert msg["content"] == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == \
        [("get_weather", {"city": "Paris"}), ("get_current_time", {})]
    joined, s_reason = _stream(plan, OUTPUT, size, "stop")
    assert s_reason == reason and joined["content"] == msg["content"]
    assert joined["reasoning_content"] == msg["reasoning_content"]
    assert [(c["name"], c["arguments"]) for c in joined["tool_calls"].values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def test_content_null_before_a_call_and_single_call_when_not_parallel() -> None:
    plan = ChatPlan(tools=TOOLS, max_calls=1)
    msg, reason = message(plan, "<tool_call>get_current_time</tool_call><tool_call>get_current_time</tool_call>",
                          "stop")
    assert msg["content"] is None and len(msg["tool_calls"]) == 1 and reason == "tool_calls"
    assert "reasoning_content" not in msg
    joined, _ = _stream(plan, "<tool_call>get_current_time</tool_call><tool_call>get_current_time</tool_call>", 5,
                        "stop")
    assert list(joined["tool_calls"]) == [0]


def test_length_keeps_its_reason_and_reasoning_can_be_dropped() -> None:
    plan = ChatPlan(reasoning=True, in_reasoning=True, include_reasoning=False)
    msg, reason = message(plan, "thinking without end", "length")
    assert reason == "length" and "reasoning_content" not in msg and msg["content"] is None
    assert delta(plan, plan.parser(), "more thinking", True) == {}


def _plan(**body) -> ChatPlan:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})

    class Tok:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    return asyncio.run(plan_chat(req, "<|assistant|>", Tok(), tool_parser_on=True, reasoning_parser_on=False))


def test_plans() -> None:
    assert _plan().spec is None
    auto = _plan(tools=TOOLS)
    assert auto.spec is None and auto.tools == TOOLS
    none = _plan(tools=TOOLS, tool_choice="none")
    assert none.tools is None and '"any_text"' in none.spec
    named = _plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
    assert '"<tool_call>search"' in named.spec and "get_weather" not in named.spec
    required = json.loads(_plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=True).spec)
    assert required["format"]["stop_after_first"] is False and len(required["format"]["tags"]) == 3
    assert _plan(bad_words=["ab"]).bad_words_token_ids == [[97, 98], [32, 97, 98]]
    with pytest.raises(APIError):
        _plan(structured_outputs={"regex": "(unclosed"})
