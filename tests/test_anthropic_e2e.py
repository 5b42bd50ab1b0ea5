"""The official anthropic SDK against a real server: Anthropic's Messages API on the shipped model (forced tool calls
whose `input` validates against the schema, the tool_result turn, stream = non-stream, count_tokens, stop
sequences), and thinking on a tiny checkpoint whose template opens `<think>` (budget_tokens caps it, then the
answer follows, also under a forced tool call's grammar).

This anthropic SDK (2.x) no longer takes `temperature` as an argument: greedy decoding goes in `extra_body`.
"""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from tests import engine_fixtures
from tests.service_fixtures import ServerProcess
from tests.test_reasoning_e2e import TAGS, TEMPLATE

pytestmark = [pytest.mark.slow, pytest.mark.server]

GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Forecast for a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
CLOCK = {"name": "now", "description": "The time", "input_schema": {"type": "object", "properties": {}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def _client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def _same(a, b) -> None:
    """Two messages equal but for their ids (and tool_use ids)."""
    def view(m):
        blocks = [{k: v for k, v in block.model_dump().items() if k not in ("id", "parsed_output")}
                  for block in m.content]
        return blocks, m.stop_reason, m.stop_sequence, m.usage.output_tokens, m.model
    assert view(a) == view(b)


# -- the shipped model -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--max-num-seqs", "8", "--kv-cache-tokens", "8192", "--device", "cpu",
                        "--enable-auto-tool-choice", "--tool-call-parser", "glm47"], log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return _client(server)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_forced_tool_call_validates(client, model, tool_choice):
    r = client.messages.create(model=model, max_tokens=256, messages=ASK, tools=[WEATHER, CLOCK],
                               tool_choice=tool_choice, extra_body=GREEDY)
    assert r.stop_reason == "tool_use" and r.id.startswith("msg_")
    [call] = [b for b in r.content if b.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name in ("get_weather", "now")
    if tool_choice["type"] == "tool":
        assert call.name == "get_weather"
    jsonschema.validate(call.input, {"get_weather": WEATHER, "now": CLOCK}[call.name]["input_schema"])


def test_tool_result_turn(client, model):
    first = client.messages.create(model=model, max_tokens=256, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    [call] = [b for b in first.content if b.type == "tool_use"]
    turn = [*ASK, {"role": "assistant", "content": first.content}]

    def result(text: str) -> list[dict]:
        return [*turn, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                     "content": [{"type": "text", "text": text}]}]}]

    follow = client.messages.create(model=model, max_tokens=24, messages=result("Sunny, 24 C."), tools=[WEATHER],
                                    extra_body=GREEDY)
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use") and follow.content
    short = client.messages.count_tokens(model=model, messages=result("Sunny."), tools=[WEATHER]).input_tokens
    longer = client.messages.count_tokens(model=model, messages=result("Sunny, 24 C."), tools=[WEATHER]).input_tokens
    assert longer > short > client.messages.count_tokens(model=model, messages=ASK, tools=[WEATHER]).input_tokens


@pytest.mark.parametrize("tools", [False, True])
def test_stream_equals_non_stream(client, model, tools):
    kwargs = dict(model=model, max_tokens=48, messages=ASK, extra_body=GREEDY)
    if tools:
        kwargs.update(tools=[WEATHER, CLOCK], tool_choice={"type": "any"}, max_tokens=256)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    _same(streamed, whole)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert ("input_json" in kinds) == tools and ("text" in kinds) != tools  # the SDK's own delta events


def test_count_tokens_is_the_prompt_of_the_same_request(client, model):
    system = "You forecast weather."
    count = client.messages.count_tokens(model=model, system=system, messages=ASK, tools=[WEATHER]).input_tokens
    r = client.messages.create(model=model, max_tokens=4, system=system, messages=ASK, tools=[WEATHER],
                               extra_body=GREEDY)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == count
    again = client.messages.create(model=model, max_tokens=4, system=system, messages=ASK, tools=[WEATHER],
                                   extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens > 0  # the prefix cache served the repeat
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == count


def test_stop_sequence(client, model):
    free = client.messages.create(model=model, max_tokens=32, messages=ASK, extra_body=GREEDY)
    text = free.content[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip()
    cut = client.messages.create(model=model, max_tokens=32, messages=ASK, stop_sequences=[stop], extra_body=GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]


def test_errors_on_the_real_server(server, client, model):
    limit = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        client.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "x = 1\n" * limit}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=ASK)


# -- thinking: a checkpoint whose template opens <think> -------------------------------------------------------------
@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer

    out = tmp_path_factory.mktemp("ckpt") / "tiny-glm5"
    out.mkdir()
    engine_fixtures.make_checkpoint(out, mtp=False, tokenizer=False, vocab_size=400, max_position_embeddings=1024)
    engine_fixtures.build_tokenizer(out, 320)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAGS])
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--model", str(out), "--max-model-len", "1024", "--kv-cache-tokens", "8192",
                        "--max-num-seqs", "8", "--device", "cpu"], log) as s:
        yield s


HELLO = [{"role": "user", "content": "hello world"}]


def _raw(server, max_tokens: int) -> str:
    """What the model writes after the thinking prompt (greedy), as plain completions see it."""
    prompt = httpx.post(server.base_url + "/tokenize", json={"messages": HELLO}).json()["tokens"]
    r = httpx.post(server.base_url + "/v1/completions", timeout=300,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    return r.json()["choices"][0]["text"]


def test_thinking_blocks_and_their_budget(thinker):
    c = _client(thinker)
    free = c.messages.create(model="tiny-glm5", max_tokens=32, messages=HELLO, thinking={"type": "adaptive"},
                             extra_body=GREEDY)
    assert free.content[0].type == "thinking" and free.content[0].thinking == _raw(thinker, 32)
    assert free.stop_reason == "max_tokens" and len(free.content) == 1  # it never closes the block by itself
    budget = 6
    capped = c.messages.create(model="tiny-glm5", max_tokens=32, messages=HELLO, extra_body=GREEDY,
                               thinking={"type": "enabled", "budget_tokens": budget})
    assert capped.content[0].type == "thinking" and capped.content[0].thinking == _raw(thinker, budget)
    assert [b.type for b in capped.content[1:]] in ([], ["text"])  # then the answer (which may be empty)
    assert capped.usage.output_tokens > budget + 1 or capped.stop_reason == "end_turn"
    off = c.messages.create(model="tiny-glm5", max_tokens=8, messages=HELLO, thinking={"type": "disabled"},
                            extra_body=GREEDY)
    assert all(b.type != "thinking" for b in off.content)
    with c.messages.stream(model="tiny-glm5", max_tokens=32, messages=HELLO, extra_body=GREEDY,
                           thinking={"type": "enabled", "budget_tokens": budget}) as stream:
        assert "thinking" in [event.type for event in stream]
        _same(stream.get_final_message(), capped)
    follow = c.messages.create(model="tiny-glm5", max_tokens=4, extra_body=GREEDY, messages=[
        *HELLO, {"role": "assistant", "content": capped.content}, {"role": "user", "content": "and?"}])
    assert follow.usage.input_tokens > capped.usage.input_tokens  # the thinking turn went into the prompt


def test_budget_under_a_forced_tool_call(thinker):
    """The budget's forced `</think>` is what the tool-call grammar expects after the reasoning."""
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"enum": ["hello", "world"]}},
                                               "required": ["q"]}}
    kwargs = dict(model="tiny-glm5", messages=HELLO, tools=[tool], tool_choice={"type": "any"}, extra_body=GREEDY)
    r = _client(thinker).messages.create(max_tokens=64, thinking={"type": "enabled", "budget_tokens": 5}, **kwargs)
    assert r.stop_reason == "tool_use", r
    assert [b.type for b in r.content] == ["thinking", "tool_use"]
    assert r.content[1].input["q"] in ("hello", "world")
    # the same thinking as the first 5 tokens the grammar lets the model think without a budget
    first = _client(thinker).messages.create(max_tokens=5, thinking={"type": "adaptive"}, **kwargs)
    assert first.stop_reason == "max_tokens" and [b.type for b in first.content] == ["thinking"]
    assert r.content[0].thinking == first.content[0].thinking


def test_chat_thinking_token_budget(thinker):
    """The chat route's own `thinking_token_budget` (vLLM's name), which budget_tokens translates to."""
    r = httpx.post(thinker.base_url + "/v1/chat/completions", timeout=300, json={
        "messages": HELLO, "max_tokens": 32, "temperature": 0, "thinking_token_budget": 3})
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == _raw(thinker, 3)
