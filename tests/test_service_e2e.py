"""End to end: `python -m service` as a real process on a tiny checkpoint that transformers wrote, driven by the
official openai SDK and raw httpx. The real engine, the real CLI, the real signal handling."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_fixtures import ServerProcess, check_stream, sse_data, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.server]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_glm_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--model", str(tiny_glm_ckpt), "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens",
                        "8192", "--max-num-seqs", "8", "--device", "cpu"], log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def samples(base_url: str, headers: dict | None = None) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", headers=headers).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snapshot: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in snapshot.items() if n == name and all(dict(lbl).get(k) == x
                                                                          for k, x in labels.items()))


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-glm"]


def test_chat_greedy_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="tiny-glm", messages=MESSAGES, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-glm", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_completions_forms_and_greedy_equality(client, server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    text = client.completions.create(model="tiny-glm", prompt="def add(a, b):", max_tokens=12, temperature=0)
    by_ids = client.completions.create(model="tiny-glm", prompt=ids, max_tokens=12, temperature=0)
    assert text.choices[0].text == by_ids.choices[0].text and text.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model="tiny-glm", prompt=ids, max_tokens=12, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    batch = client.completions.create(model="tiny-glm", prompt=[ids, ids], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert len({c.text for c in batch.choices}) == 1  # greedy: every choice of every copy agrees


def test_n_seed_logprobs_echo(client):
    kw = dict(model="tiny-glm", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2, seed=11, logprobs=True,
              top_logprobs=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert sum(len(c.logprobs.content) for c in a.choices) == a.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for c in a.choices for e in c.logprobs.content)
    echo = client.completions.create(model="tiny-glm", prompt="Hello", max_tokens=4, temperature=0, echo=True,
                                     logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("Hello")
    assert len(lp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens and lp.token_logprobs[0] is None


def test_async_sdk_concurrent(server):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

        async def one() -> str:
            stream = await client.chat.completions.create(model="tiny-glm", messages=MESSAGES, max_tokens=10,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*[one() for _ in range(6)])
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(set(results)) == 1  # batched greedy == alone


@pytest.mark.parametrize("path,body,obj", [
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2, "temperature": 0.9}, "chat.completion.chunk"),
    ("/v1/completions", {"prompt": ["a", "b"], "temperature": 0.9}, "text_completion")])
def test_raw_sse_framing(server, path, body, obj):
    r = httpx.post(server.base_url + path, timeout=60, json={**body, "max_tokens": 8, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = check_stream(sse_data(r.text), 2, obj, usage=True)
    if obj == "chat.completion.chunk":
        assert all(ch["delta"]["role"] == "assistant" for ch in chunks[0]["choices"])


def test_metrics_counters_match(server, client):
    before = samples(server.base_url)
    usages = [client.chat.completions.create(model="tiny-glm", messages=MESSAGES, max_tokens=5, temperature=0).usage,
              client.completions.create(model="tiny-glm", prompt="Hi", max_tokens=3, n=2, temperature=0).usage]
    after = samples(server.base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("glm_serve:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("glm_serve:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("glm_serve:request_success_total") == 3
    assert delta("glm_serve:time_to_first_token_seconds_count") == 2
    assert delta("glm_serve:http_requests_total", route="/v1/completions", status="200") == 1
    assert all(dict(lbl).get("model_name") == "tiny-glm" for (_, lbl) in after)
    assert value(after, "glm_serve:dsa_tokens_cached_total") > 0  # the real engine reports DSA work


def test_disconnects_free_everything(server):
    before = samples(server.base_url)
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=60,
                          json={"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 8:
                    break

    def idle() -> bool:
        now = samples(server.base_url)
        return value(now, "glm_serve:num_requests_running") == 0 and value(now, "glm_serve:kv_cache_usage_perc") == 0

    wait_until(idle, what="no running request and an empty cache after the hang-ups")
    now = samples(server.base_url)
    assert value(now, "glm_serve:request_success_total", finished_reason="abort") - \
        value(before, "glm_serve:request_success_total", finished_reason="abort") == 3
    # 400 tokens each would have taken far longer than the wait: the requests were aborted, not finished
    assert value(now, "glm_serve:generation_tokens_total") - value(before, "glm_serve:generation_tokens_total") < 600


def test_prompts_not_logged(server, client):
    marker, rid = "zebra-marker-7731", "prompts-not-logged-1"
    client.chat.completions.create(model="tiny-glm", messages=[{"role": "user", "content": marker}], max_tokens=2,
                                   extra_headers={"X-Request-Id": rid})
    # the request's last log line is written after its response: wait for it, then read the whole log
    wait_until(lambda: any(rid in line and "completed" in line for line in server.log().splitlines()),
               what="the request's 'completed' log line")
    assert marker not in server.log()


def test_repeated_prompts_report_cached_tokens_and_move_the_counters(server, client):
    ids = list(range(100, 150))  # 50 tokens: three full blocks of 16, the last token always computed
    before = samples(server.base_url)
    first, second = (client.completions.create(model="tiny-glm", prompt=ids, max_tokens=3, temperature=0)
                     for _ in range(2))
    after = samples(server.base_url)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 48
    assert second.choices[0].text == first.choices[0].text
    for name, tokens in (("queries", 100), ("hits", 48)):
        metric = f"glm_serve:prefix_cache_{name}_total"
        assert value(after, metric) - value(before, metric) == tokens, name

    # Streamed chat: the final usage chunk carries them; a cache_salt shares only with the same salt.
    messages = [{"role": "system", "content": "You answer in one short sentence. " * 6}, MESSAGES[1]]

    def cached(salt: str) -> int:
        chunks = list(client.chat.completions.create(
            model="tiny-glm", messages=messages, max_tokens=2, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"cache_salt": salt}))
        return chunks[-1].usage.prompt_tokens_details.cached_tokens

    a1, b1, a2, b2 = cached("tenant-a"), cached("tenant-b"), cached("tenant-a"), cached("tenant-b")
    assert a1 == b1 == 0 and a2 == b2 > 16
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


# -- a second server: small queue, one sequence at a time, API keys from the environment; SIGTERM last ----------
KEYS = {"GLM_SERVE_API_KEY": "alpha,beta"}
AUTH = {"Authorization": "Bearer beta"}


@pytest.fixture(scope="module")
def strict(tiny_glm_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "strict.log"
    with ServerProcess(["--model", str(tiny_glm_ckpt), "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens",
                        "8192", "--max-num-seqs", "1", "--max-queue-size", "1", "--retry-after", "2",
                        "--shutdown-timeout", "60", "--log-format", "json"], log, env=KEYS) as s:
        yield s


def test_auth(strict):
    url = strict.base_url
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer gamma"}).status_code == 401
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer alpha"}).status_code == 200
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + probe).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_overload(strict):
    before = value(samples(strict.base_url), "glm_serve:admission_rejections_total", reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=strict.base_url, headers=AUTH, timeout=120) as c:
            body = {"messages": MESSAGES, "max_tokens": 32, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(12)])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "queue_full" for r in rejected)
    after = value(samples(strict.base_url), "glm_serve:admission_rejections_total", reason="queue_full")
    assert after - before == len(rejected)


def test_sigterm_drains_in_flight_stream_then_exits_0(strict):
    url = strict.base_url
    events: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=120,
                          json={"messages": MESSAGES, "max_tokens": 450, "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            buf = ""
            for piece in r.iter_text():
                buf += piece
                first_chunk.set()
            events.extend(sse_data(buf))

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    strict.terminate()
    wait_until(lambda: httpx.get(url + "/ready").status_code == 503, 5, "/ready 503 after SIGTERM")
    refused = httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert "retry-after" in refused.headers
    assert httpx.get(url + "/health").status_code == 200
    assert reader.is_alive(), "the stream should still be running while the new request is refused"
    reader.join(120)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 450
    assert strict.proc.wait(60) == 0
    lines = [json.loads(line) for line in strict.log().splitlines() if line.startswith("{")]
    assert any("draining" in entry["message"] for entry in lines)
    assert any(entry.get("request_id") and entry["message"] == "completed" for entry in lines)
