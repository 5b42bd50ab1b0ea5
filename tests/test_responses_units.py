"""The Responses API's parts without a server: the store's size and TTL bounds, the translation of items into chat
messages, and the output builder (a stream cut anywhere gives the items and events of the whole text)."""

from __future__ import annotations

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from service.api.chat_agents import ChatPlan
from service.api.response_store import ResponseStore
from service.api.responses_output import OutputBuilder, feed_text, response_object, response_usage
from service.api.responses_protocol import ResponsesRequest, items_to_messages, to_chat

TOOL = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _resp(rid: str) -> dict:
    return {"id": rid, "output": [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": rid, "annotations": []}]}]}


def test_store_drops_the_least_recently_used_beyond_its_size():
    store = ResponseStore(size=2, ttl=60, clock=Clock())
    store.put(_resp("a"), [])
    store.put(_resp("b"), [])
    assert store.get("a") is not None  # a is now the most recently used
    store.put(_resp("c"), [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2


def test_store_forgets_after_the_ttl():
    clock = Clock()
    store = ResponseStore(size=10, ttl=5, clock=clock)
    store.put(_resp("a"), [{"type": "message", "role": "user", "content": "hi"}])
    clock.now = 4.9
    assert store.conversation("a") == [{"type": "message", "role": "user", "content": "hi"},
                                       *_resp("a")["output"]]
    clock.now = 5.0
    assert store.get("a") is None and store.conversation("a") is None and len(store) == 0


def test_store_of_size_zero_keeps_nothing_and_delete_says_whether_it_held_it():
    none = ResponseStore(size=0, ttl=60)
    none.put(_resp("a"), [])
    assert none.get("a") is None
    store = ResponseStore(size=1, ttl=60)
    store.put(_resp("a"), [])
    assert store.delete("a") and not store.delete("a")


def test_items_become_the_chat_conversation():
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Be "}, {"type": "input_text",
                                                                              "text": "brief."}]},
        {"type": "message", "role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                         "text": "Two calls."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}"},
    ]
    assert items_to_messages(items) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Two calls.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    ]


def test_request_translates_to_chat():
    req = ResponsesRequest.model_validate({
        "input": "hi", "instructions": "Be brief.", "tools": [TOOL], "tool_choice": {"type": "function",
                                                                                   "name": "get_weather"},
        "max_output_tokens": 7, "temperature": 0, "reasoning": {"effort": "minimal"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}}})
    chat = to_chat(req, req.input_items())
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert chat.max_tokens == 7 and chat.temperature == 0 and chat.parallel_tool_calls is False
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL["parameters"]}}]
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                           "strict": True}}
    high = ResponsesRequest.model_validate({"input": "hi", "reasoning": {"effort": "high"}})
    assert to_chat(high, high.input_items()).chat_template_kwargs == {"enable_thinking": True}
    with pytest.raises(ValueError, match="input is empty"):
        to_chat(high, [])


@pytest.mark.parametrize("body,words", [
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "'web_search' is not supported"),
    ({"input": "hi", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "code_interpreter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input_image"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
    ({"input": "hi", "tool_choice": {"type": "file_search"}}, "file_search"),
    ({"input": "hi", "reasoning": {"effort": "maximal"}}, "reasoning.effort"),
    ({"input": "hi", "background": True}, "background"),
])
def test_refusals_name_what_is_unsupported(body, words):
    with pytest.raises(ValidationError) as e:
        ResponsesRequest.model_validate(body)
    assert words in str(e.value)


TEXT = ("<think>Let me think.</think>Sure.\n<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
        "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>")


def _plan() -> ChatPlan:
    return ChatPlan(reasoning=True, tools=[{"type": "function", "function": TOOL}])


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11, 1000])
def test_a_stream_cut_anywhere_builds_the_same_items(cut):
    from service.api import chat_agents

    whole = OutputBuilder()
    feed_text(whole, _plan(), TEXT)
    whole.finish("completed")
    plan, streamed = _plan(), OutputBuilder()
    parser, events = plan.parser(), []
    pieces = [TEXT[i:i + cut] for i in range(0, len(TEXT), cut)]
    for i, piece in enumerate(pieces):
        events += streamed.feed(chat_agents.delta(plan, parser, piece, i == len(pieces) - 1))
    events += streamed.finish("completed")
    strip = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in streamed.items]
    assert strip == [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in whole.items]
    assert [i["type"] for i in streamed.items] == ["reasoning", "message", "function_call"]
    assert streamed.items[1]["content"][0]["text"] == "Sure."  # the newline before the call is not content
    assert streamed.items[2]["arguments"] == '{"city": "Paris", "days": 2}'
    adapter = TypeAdapter(ResponseStreamEvent)
    for n, event in enumerate(events):
        adapter.validate_python({**event, "sequence_number": n})
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"] for e in done] == streamed.items


def test_empty_output_is_one_empty_message_and_the_response_validates():
    b = OutputBuilder()
    feed_text(b, ChatPlan(), "")
    b.finish("incomplete")
    assert [(i["type"], i["status"], i["content"][0]["text"]) for i in b.items] == [("message", "incomplete", "")]
    req = ResponsesRequest.model_validate({"input": "hi", "metadata": {"k": "v"}, "tools": [TOOL]})
    Response.model_validate(response_object(req, "resp_1", 0, "m", "incomplete", b.items,
                                            response_usage(3, 4, 1, 0)))
