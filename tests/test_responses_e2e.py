"""The Responses API through the official openai SDK against a real server on the shipped model: forced function
calls whose arguments validate (jsonschema), the next turn with a function_call_output, previous_response_id,
store: false, text.format json_schema, streamed = non-streamed (greedy); and reasoning items on a checkpoint whose
template opens `<think>`.

The oracle for "the translation is right" is the chat endpoint: the same conversation sent as chat messages
(greedy) must give the same text, since /v1/responses is a translation onto the chat path.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from tests.service_fixtures import ServerProcess
from tests.test_reasoning_e2e import checkpoint as glm5_checkpoint  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.server]

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
    "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Forecast for a city",
           "parameters": WEATHER_SCHEMA, "strict": True}
CLOCK = {"type": "function", "name": "now", "description": "The time", "parameters": {"type": "object",
                                                                                        "properties": {}}}
ASK = "What will the weather be in Paris for the next 3 days?"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--max-num-seqs", "8", "--kv-cache-tokens", "8192", "--device", "cpu"], log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _chat_text(client, model, messages, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content or ""


def _calls(r) -> list:
    return [item for item in r.output if item.type == "function_call"]


def _shape(r) -> list:
    """A response's output without the per-response item ids (nor what the SDK's stream helper adds: parsed_*)."""
    def text(item) -> list:
        return [(c.type, c.text) for c in getattr(item, "content", None) or []]
    return [(item.type, getattr(item, "status", None), getattr(item, "name", None),
             getattr(item, "arguments", None), text(item)) for item in r.output]


def _usage(r: dict) -> tuple:
    """Token counts, but for cached_tokens: the second of two equal requests finds the first's prompt cached."""
    u = r["usage"]
    return u["input_tokens"], u["output_tokens"], u["output_tokens_details"]["reasoning_tokens"], u["total_tokens"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_call_validates(client, model, tool_choice):
    r = client.responses.create(model=model, input=ASK, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
                                max_output_tokens=256, temperature=0)
    Response.model_validate(r.model_dump())
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    [call] = _calls(r)
    assert call.status == "completed" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    if isinstance(tool_choice, dict):
        assert call.name == "get_weather"
    if call.name == "get_weather":
        jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.tool_choice == tool_choice or r.tool_choice.model_dump(exclude_none=True) == tool_choice


def test_next_turn_with_function_call_output_is_the_chat_conversation(client, model):
    first = client.responses.create(model=model, input=ASK, tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=256, temperature=0, store=False)
    [call] = _calls(first)
    result = "Sunny, 21 degrees."
    turn = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": result}]
    second = client.responses.create(model=model, input=turn, tools=[WEATHER], max_output_tokens=24, temperature=0)
    messages = [{"role": "user", "content": ASK},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": result}]
    chat_tools = [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters",
                                                                             "strict")}}]
    expected = _chat_text(client, model, messages, tools=chat_tools, max_tokens=24)
    assert second.output_text == expected and expected


def test_previous_response_id_continues_the_stored_response(client, model):
    first = client.responses.create(model=model, input="def add(a, b):", instructions="Write Python.",
                                    max_output_tokens=12, temperature=0)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(model=model, input="Now subtract.", previous_response_id=first.id,
                                     instructions="Write Python.", max_output_tokens=12, temperature=0)
    assert second.previous_response_id == first.id
    expected = _chat_text(client, model, [{"role": "system", "content": "Write Python."},
                                          {"role": "user", "content": "def add(a, b):"},
                                          {"role": "assistant", "content": first.output_text},
                                          {"role": "user", "content": "Now subtract."}], max_tokens=12)
    assert second.output_text == expected
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_store_false_keeps_nothing(client, model):
    r = client.responses.create(model=model, input="hello", max_output_tokens=4, temperature=0, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input="more", previous_response_id=r.id, max_output_tokens=4)
    assert e.value.body["code"] == "previous_response_not_found"
    assert e.value.body["param"] == "previous_response_id"


def test_json_schema_output_validates(client, model):
    r = client.responses.create(model=model, input="A person, please.", max_output_tokens=128, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("case", ["call", "json"])
def test_sdk_stream_equals_non_streamed(client, model, case):
    kwargs = dict(model=model, input=ASK, max_output_tokens=256, temperature=0, store=False)
    if case == "call":
        kwargs.update(tools=[WEATHER, CLOCK], tool_choice="required")
    else:
        kwargs.update(text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        types = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert ("response.function_call_arguments.done" in types) == (case == "call")
    assert _shape(streamed) == _shape(whole) and _usage(streamed.model_dump()) == _usage(whole.model_dump())
    assert streamed.status == whole.status == "completed"


def test_raw_stream_events_are_numbered_and_build_the_output(server, model):
    body = {"model": model, "input": "hello", "max_output_tokens": 6, "temperature": 0, "store": False}
    whole = httpx.post(server.base_url + "/v1/responses", json=body, timeout=120).json()
    r = httpx.post(server.base_url + "/v1/responses", json={**body, "stream": True}, timeout=120)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.text.strip("\n").split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == "event: " + event["type"]
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete" and final["incomplete_details"] == {
        "reason": "max_output_tokens"}
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == final["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    assert final["status"] == whole["status"] == "incomplete" and _usage(final) == _usage(whole)
    Response.model_validate(final)


# -- reasoning: a checkpoint whose chat template opens <think> (tests/test_reasoning_e2e.py) ------------------------
@pytest.fixture(scope="module")
def glm5_server(glm5_checkpoint, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("logs") / "glm5.log"
    with ServerProcess(["--model", str(glm5_checkpoint), "--max-model-len", "1024", "--kv-cache-tokens", "8192",
                        "--max-num-seqs", "8", "--device", "cpu"], log) as s:
        yield s


def _ban(server, tags: str) -> dict[str, int]:
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": tags, "add_special_tokens": False}).json()
    return {str(i): -100 for i in ids["tokens"]}


def test_reasoning_items(glm5_server):
    client = openai.OpenAI(base_url=glm5_server.base_url + "/v1", api_key="unused", max_retries=0)
    bias = _ban(glm5_server, "</think><tool_call>")  # the random model then reasons until max_output_tokens
    chat = httpx.post(glm5_server.base_url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 16, "temperature": 0,
        "logit_bias": bias}).json()["choices"][0]["message"]
    assert chat["reasoning_content"]
    # logit_bias is no OpenAI Responses field: vLLM's extensions go in extra_body
    kwargs = dict(model=client.models.list().data[0].id, input="hello world", max_output_tokens=16, temperature=0,
                  extra_body={"logit_bias": bias})
    r = client.responses.create(**kwargs)
    [item] = r.output
    assert item.type == "reasoning" and item.summary == []
    assert [c.text for c in item.content] == [chat["reasoning_content"]]
    assert r.status == "incomplete" and r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(**kwargs, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == chat["reasoning_content"] and events[-1].response.output[0].content[0].text == text
    no_think = {"logit_bias": _ban(glm5_server, "<think><tool_call>")}  # nor may it open a block itself
    off = client.responses.create(**{**kwargs, "extra_body": no_think}, reasoning={"effort": "none"})
    assert all(item.type != "reasoning" for item in off.output)
    chat_off = httpx.post(glm5_server.base_url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 16, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False}, **no_think}).json()["choices"][0]["message"]
    assert off.output_text == chat_off["content"] and not chat_off.get("reasoning_content")
    assert off.reasoning.effort == "none"
