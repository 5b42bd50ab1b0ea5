"""The official openai SDK (sync and async) against the real app and server, with the fake engine behind it.

The fake engine is deterministic, so greedy answers can be compared across streaming and non-streaming, and
token counts checked exactly. tests/test_service_e2e.py repeats the core of this against the real engine.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(engine={"max_model_len": 256}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server.ctx.model_name


def prompt_len(server, messages) -> int:
    r = httpx.post(server.base_url + "/tokenize", json={"messages": messages})
    assert r.status_code == 200
    return r.json()["count"]


def test_models(client, model, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert client.models.retrieve(model).id == model
    assert models.data[0].model_extra["max_model_len"] == server.ctx.max_model_len


def test_chat_non_streaming_usage(client, model, server):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_len(server, MESSAGES)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_stream_equals_non_stream_greedy(client, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n_and_seed(client, model):
    kw = dict(model=model, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # choice i draws from its own stream
    assert 3 <= a.usage.completion_tokens <= 24


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    without = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert without.choices[0].logprobs is None


def test_chat_stop_string_and_max_completion_tokens(client, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[5:8]
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    assert r.choices[0].message.content == full[:full.index(stop)]
    short = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_completions_prompt_forms(client, model, server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    by_text = client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=model, prompt=["Hello world", "Numbers"], max_tokens=4, temperature=0,
                                      n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    lists = client.completions.create(model=model, prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert len(lists.choices) == 2
    assert lists.usage.prompt_tokens == len(ids) + 2


def test_completions_logprobs_and_echo(client, model):
    r = client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0, logprobs=1,
                                     echo=True)
    assert echo.choices[0].text == "Hello world" + r.choices[0].text
    elp = echo.choices[0].logprobs
    assert len(elp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert elp.tokens[-len(lp.tokens):] == lp.tokens


def test_completions_stream_equals_non_stream(client, model):
    full = client.completions.create(model=model, prompt="Numbers: 1 2 3", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="Numbers: 1 2 3", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_return_tokens_as_token_ids(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       extra_body={"return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") for e in r.choices[0].logprobs.content)


def test_async_client_concurrent(server, model):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        reference = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                                         temperature=0)

        async def streamed() -> str:
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def completion() -> str:
            r = await client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0)
            return r.choices[0].text

        results = await asyncio.gather(*[streamed() for _ in range(4)], *[completion() for _ in range(4)])
        assert results[:4] == [reference.choices[0].message.content] * 4
        assert len(set(results[4:])) == 1
        await client.close()

    asyncio.run(run())


def test_sdk_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"


def test_cors_off_by_default(server):
    r = httpx.options(server.base_url + "/v1/models",
                      headers={"Origin": "https://example.com", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
