"""Agent frameworks against a real server on the shipped model: the openai SDK (forced tool calls, streamed calls
accumulated by the SDK, `parse` with pydantic), the openai-agents SDK running a Python function tool, and
langchain-openai (`bind_tools`, `with_structured_output` by json_schema, function_calling and json_mode).

Forced tool calls and structured outputs come back well-formed whatever the shipped model would write, because
the grammar decides which tokens it may pick. Every call's arguments are validated against
the tool's schema with jsonschema (an oracle no one here wrote).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.service_fixtures import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.server]

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                            "parameters": WEATHER_SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


class Person(BaseModel):
    """Every string bounded: a grammar ends what it bounds, but an unbounded string ends only when the model closes
    it, and a tiny model may not (the GPU-trained default model wrote one `languages` item until max_tokens)."""
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=130)
    languages: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--max-num-seqs", "8", "--kv-cache-tokens", "8192", "--device", "cpu",
                        "--enable-auto-tool-choice", "--tool-call-parser", "glm47"], log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _check_call(call, tools: list[dict]) -> dict:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schemas
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schemas[call.function.name])
    return args


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_parses_and_validates(client, model, tool_choice):
    tools = [WEATHER, CLOCK] if isinstance(tool_choice, dict) else [WEATHER]
    r = client.chat.completions.create(model=model, messages=ASK, tools=tools, tool_choice=tool_choice,
                                       max_tokens=256, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _check_call(call, tools)


def test_required_picks_among_tools_sampled(client, model):
    tools = [WEATHER, CLOCK]
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=ASK, tools=tools, tool_choice="required",
                                           max_tokens=256, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        for call in r.choices[0].message.tool_calls:
            _check_call(call, tools)


def test_streamed_calls_accumulated_by_the_sdk_equal_non_streamed(client, model):
    kwargs = dict(model=model, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=256,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_choice_none_leaks_no_markup(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       max_tokens=48, temperature=1.0, seed=3)
    assert not r.choices[0].message.tool_calls
    assert "<tool_call>" not in (r.choices[0].message.content or "")


def test_sdk_parse_with_pydantic(client, model):
    r = client.beta.chat.completions.parse(model=model, messages=[{"role": "user", "content": "A person, please."}],
                                           response_format=Person, max_tokens=128, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Person)


def test_openai_agents_runs_a_function_tool(server, model):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[tuple[str, int]] = []

    # Bounded like WEATHER: a model that does not close a value (a small one, greedy) may otherwise write an
    # unbounded string until max_tokens, and a truncated call cannot validate.
    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=24)], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """Forecast for a city.

        Args:
            city: the city
            days: how many days ahead
        """
        calls.append((city, days))
        return f"sunny in {city} for {days} days"

    async def run() -> object:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        agent = Agent(name="forecaster", instructions="Answer with the forecast.", tools=[get_weather],
                      model=OpenAIChatCompletionsModel(model=model, openai_client=aclient),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=256, temperature=0))
        return await Runner.run(agent, "Weather in Paris for 2 days?", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0][0], str) and isinstance(calls[0][1], int)
    assert isinstance(result.final_output, str)


def _chat_model(server, model):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=server.base_url + "/v1", api_key="unused", max_tokens=128,
                      temperature=0, max_retries=0)


@pytest.mark.parametrize("tool_choice", ["required", "get_weather"])
def test_langchain_bind_tools(server, model, tool_choice):
    llm = _chat_model(server, model).bind_tools([WEATHER, CLOCK], tool_choice=tool_choice)
    msg = llm.invoke("Weather in Oslo for 2 days?")
    assert msg.tool_calls
    for call in msg.tool_calls:
        assert call["name"] in ("get_weather", "now")
        if call["name"] == "get_weather":
            jsonschema.validate(call["args"], WEATHER_SCHEMA)
    if tool_choice == "get_weather":
        assert [c["name"] for c in msg.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, model, method):
    out = _chat_model(server, model).with_structured_output(Person, method=method).invoke("A person, please.")
    assert isinstance(out, Person)


def test_langchain_structured_output_json_mode(server, model):
    """json_mode sends no schema, so nothing bounds a string: the answer ends when the model closes its object.
    Greedy, the shipped model does for this request (for "Reply in JSON: a person." it writes one key until
    max_tokens); the client path, not the model's JSON, is what is tested here."""
    schema = {"title": "Anything", "type": "object", "properties": {}}
    out = _chat_model(server, model).with_structured_output(schema, method="json_mode").invoke("Reply in JSON.")
    assert isinstance(out, dict)
