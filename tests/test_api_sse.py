"""SSE framing on the wire (raw httpx): `data: {json}\\n\\n` events, role first, one finish_reason per choice,
the usage chunk with `choices: []`, `data: [DONE]` last, also after an error."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.service_fixtures import check_stream, sse_data, wait_until

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server() as s:
        yield s


def post_stream(server, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    r = httpx.post(server.base_url + path, json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, sse_data(r.text)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("usage", [False, True])
def test_chat_framing(server, n, usage):
    body = {"messages": MESSAGES, "max_tokens": 12, "n": n, "temperature": 0.8, "seed": 1}
    if usage:
        body["stream_options"] = {"include_usage": True}
    _, events = post_stream(server, "/v1/chat/completions", body)
    chunks = check_stream(events, n, "chat.completion.chunk", usage)
    first = chunks[0]["choices"]
    assert [c["index"] for c in first] == list(range(n))
    assert all(c["delta"] == {"role": "assistant", "content": ""} for c in first)
    assert all("role" not in ch["delta"] for c in chunks[1:] for ch in c["choices"])
    if usage:
        texts = {i: "" for i in range(n)}
        for c in chunks[1:-1]:
            for ch in c["choices"]:
                texts[ch["index"]] += ch["delta"].get("content", "")
        assert chunks[-1]["usage"]["completion_tokens"] >= n


def test_completions_framing_and_usage(server):
    _, events = post_stream(server, "/v1/completions", {"prompt": ["Hello", "World"], "max_tokens": 6, "n": 2,
                                                        "stream_options": {"include_usage": True}})
    chunks = check_stream(events, 4, "text_completion", usage=True)
    assert all(set(ch) >= {"index", "text", "logprobs", "finish_reason"} for c in chunks[:-1] for ch in c["choices"])


def test_greedy_stream_equals_non_stream(server):
    body = {"messages": MESSAGES, "max_tokens": 25, "temperature": 0}
    full = httpx.post(server.base_url + "/v1/chat/completions", json=body).json()
    _, events = post_stream(server, "/v1/chat/completions", body)
    chunks = check_stream(events, 1, "chat.completion.chunk", usage=False)
    assert "".join(ch["delta"].get("content", "") for c in chunks for ch in c["choices"]) == \
        full["choices"][0]["message"]["content"]

    cbody = {"prompt": [5, 6, 7, 8], "max_tokens": 25, "temperature": 0}
    cfull = httpx.post(server.base_url + "/v1/completions", json=cbody).json()
    _, events = post_stream(server, "/v1/completions", cbody)
    chunks = check_stream(events, 1, "text_completion", usage=False)
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == cfull["choices"][0]["text"]


def test_continuous_usage_stats(server):
    _, events = post_stream(server, "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    generated = [c["usage"]["completion_tokens"] for c in chunks]
    assert generated == sorted(generated) and generated[-1] == 5


def test_stream_logprobs(server):
    _, events = post_stream(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "temperature": 0,
                                                             "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
    chunks = [json.loads(e) for e in events[:-1]]
    entries = [e for c in chunks[1:] for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert len(entries) == 5 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_error_mid_stream_then_done(thread_server):
    """An engine fault after the stream started: an error event, then [DONE], nothing else."""
    with thread_server(engine={"step_s": 0.02}) as s, httpx.stream(
            "POST", s.base_url + "/v1/chat/completions", timeout=30,
            json={"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        raw, killed = "", False
        for piece in r.iter_text():
            raw += piece
            if raw.count("\n\n") >= 3 and not killed:
                s.in_loop(s.engine.kill, "boom")
                killed = True
        events = sse_data(raw)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert set(err) == {"error"} and "boom" in err["error"]["message"] and err["error"]["code"] == "engine_error"
        assert all("error" not in json.loads(e) for e in events[:-2])
        # the dead engine: liveness fails, new requests are refused without a 500
        assert httpx.get(s.base_url + "/health").status_code == 503
        refused = httpx.post(s.base_url + "/v1/chat/completions", json={"messages": MESSAGES})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(s.base_url + "/ready").status_code == 503


def test_request_timeout(thread_server):
    with thread_server(engine={"step_s": 0.02}, request_timeout=0.3) as s:
        body = {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
        # 200 tokens would take 4 s: a 504 within the client's 3 s timeout proves the server cut it
        r = httpx.post(s.base_url + "/v1/chat/completions", json=body, timeout=3)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        _, events = post_stream(s, "/v1/chat/completions", body)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        wait_until(lambda: s.engine.num_unfinished() == 0, 5, "the timed-out requests end in the engine")
        assert s.engine.used_blocks == 0
        assert httpx.post(s.base_url + "/v1/chat/completions",
                          json={**body, "max_tokens": 3}).status_code == 200
