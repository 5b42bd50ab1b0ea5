"""Anthropic's Messages API on the fake engine: bad requests, table-driven, each with the documented status and
Anthropic's error shape (`{"type": "error", "error": {"type", "message"}, "request_id"}`); the 401 of both key
headers; admission (503 + Retry-After) and metrics shared with the chat route; /v1/models in both shapes."""

from __future__ import annotations

import json
import threading

import anthropic
import httpx
import pytest

from tests.service_fixtures import wait_until

MSGS, COUNT = "/v1/messages", "/v1/messages/count_tokens"
USER = [{"role": "user", "content": "hi"}]
KEY = "secret"
MAX_MODEL_LEN = 128
BODY_LIMIT = 4096
TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}


def msg(**kw):
    return {"max_tokens": 4, "messages": USER, **kw}


def user(*blocks):
    return msg(messages=[{"role": "user", "content": list(blocks)}])


# (id, path, body: dict | bytes, status, Anthropic error type)
CASES = [
    ("not-json", MSGS, b"{", 400, "invalid_request_error"),
    ("no-max-tokens", MSGS, {"messages": USER}, 400, "invalid_request_error"),
    ("max-tokens-zero", MSGS, msg(max_tokens=0), 400, "invalid_request_error"),
    ("no-messages", MSGS, {"max_tokens": 4}, 400, "invalid_request_error"),
    ("empty-messages", MSGS, msg(messages=[]), 400, "invalid_request_error"),
    ("system-role", MSGS, msg(messages=[{"role": "system", "content": "x"}]), 400, "invalid_request_error"),
    ("content-number", MSGS, msg(messages=[{"role": "user", "content": 5}]), 400, "invalid_request_error"),
    ("image-block", MSGS, user({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                            "data": "AA=="}}), 400, "invalid_request_error"),
    ("document-block", MSGS, user({"type": "document", "source": {"type": "text", "data": "x"}}), 400,
     "invalid_request_error"),
    ("image-in-tool-result", MSGS, user({"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}), 400, "invalid_request_error"),
    ("unknown-block", MSGS, user({"type": "wizard"}), 400, "invalid_request_error"),
    ("text-block-no-text", MSGS, user({"type": "text"}), 400, "invalid_request_error"),
    ("tool-use-from-user", MSGS, user({"type": "tool_use", "id": "t", "name": "f", "input": {}}), 400,
     "invalid_request_error"),
    ("tool-use-input-string", MSGS, msg(messages=[*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]), 400, "invalid_request_error"),
    ("tool-result-no-id", MSGS, user({"type": "tool_result", "content": "x"}), 400, "invalid_request_error"),
    ("system-image", MSGS, msg(system=[{"type": "image", "source": {}}]), 400, "invalid_request_error"),
    # schemathesis: a block 'type' that is an object or a list is unhashable; it was a 500 (stop 35)
    ("system-type-object", MSGS, msg(system=[{"type": {}, "text": ""}]), 400, "invalid_request_error"),
    ("system-type-list", COUNT, {"messages": USER, "system": [{"type": [], "text": ""}]}, 400,
     "invalid_request_error"),
    ("tool-result-type-object", MSGS, user({"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": {}, "text": "x"}]}), 400, "invalid_request_error"),
    ("temperature-above-one", MSGS, msg(temperature=1.5), 400, "invalid_request_error"),
    ("top-p-zero", MSGS, msg(top_p=0), 400, "invalid_request_error"),
    ("top-k-negative", MSGS, msg(top_k=-1), 400, "invalid_request_error"),
    ("stop-sequence-empty", MSGS, msg(stop_sequences=[""]), 400, "invalid_request_error"),
    ("stop-sequences-string", MSGS, msg(stop_sequences="x"), 400, "invalid_request_error"),
    ("server-tool", MSGS, msg(tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400,
     "invalid_request_error"),
    ("tool-no-schema", MSGS, msg(tools=[{"name": "f"}]), 400, "invalid_request_error"),
    ("tool-choice-unknown", MSGS, msg(tools=[TOOL], tool_choice={"type": "sometimes"}), 400, "invalid_request_error"),
    ("tool-choice-missing-tool", MSGS, msg(tools=[TOOL], tool_choice={"type": "tool", "name": "g"}), 400,
     "invalid_request_error"),
    ("tool-choice-any-no-tools", MSGS, msg(tool_choice={"type": "any"}), 400, "invalid_request_error"),
    ("thinking-no-budget", MSGS, msg(thinking={"type": "enabled"}), 400, "invalid_request_error"),
    ("thinking-budget-over-max", MSGS, msg(max_tokens=8, thinking={"type": "enabled", "budget_tokens": 8}), 400,
     "invalid_request_error"),
    ("thinking-unknown", MSGS, msg(thinking={"type": "maybe"}), 400, "invalid_request_error"),
    ("metadata-string", MSGS, msg(metadata="x"), 400, "invalid_request_error"),
    ("context-length", MSGS, msg(messages=[{"role": "user", "content": "hi " * MAX_MODEL_LEN}]), 400,
     "invalid_request_error"),
    ("unknown-model", MSGS, msg(model="claude-opus-9"), 404, "not_found_error"),
    ("body-too-large", MSGS, msg(pad="x" * (2 * BODY_LIMIT)), 413, "request_too_large"),
    ("count-unknown-model", COUNT, {"model": "claude-opus-9", "messages": USER}, 404, "not_found_error"),
    ("count-image", COUNT, {"messages": user({"type": "image", "source": {}})["messages"]}, 400,
     "invalid_request_error"),
    ("count-no-messages", COUNT, {}, 400, "invalid_request_error"),
    ("unknown-messages-route", "/v1/messages/batches", msg(), 404, "not_found_error"),
]


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(engine={"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8}, api_key=[KEY],
                       max_request_body_bytes=BODY_LIMIT, max_queue_size=1) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30, headers={"x-api-key": KEY}) as c:
        yield c


def _anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert set(data) == {"type", "error", "request_id"} and data["type"] == "error", data
    assert set(data["error"]) == {"type", "message"} and data["error"]["type"] == kind, data
    assert data["request_id"] == r.headers["x-request-id"]
    assert data["error"]["message"] and "Traceback" not in r.text
    return data["error"]["message"]


def test_table_is_big_enough():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(client, case):
    _, path, body, status, kind = case
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    _anthropic_error(r, status, kind)


def test_messages_name_the_block(client):
    message = _anthropic_error(client.post(MSGS, json=user({"type": "text", "text": "a"}, {"type": "image"})), 400,
                               "invalid_request_error")
    assert "messages.0" in message and "content[1]" in message and "image" in message


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}])
def test_keys(server, headers):
    r = httpx.post(server.base_url + MSGS, json=msg(), headers=headers)
    _anthropic_error(r, 401, "authentication_error")
    assert KEY not in r.text
    ok = [{"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY, "authorization": "Bearer x"}]
    for good in ok:
        assert httpx.post(server.base_url + MSGS, json=msg(), headers=good).status_code == 200
    # other routes take x-api-key too, and keep OpenAI's error shape
    assert httpx.get(server.base_url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(server.base_url + "/v1/models", headers=headers).json()["error"]["code"] == "invalid_api_key"


def test_sdk_raises_the_right_exceptions(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny-fake", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-opus-9", max_tokens=4, messages=USER)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="nope", max_retries=0).messages.count_tokens(
            model="tiny-fake", messages=USER)


def test_full_queue_is_503_with_retry_after(server, client):
    """One admission queue for every route: a held chat request fills it, and /v1/messages gets the 503."""
    results = []
    chat = threading.Thread(target=lambda: results.append(httpx.post(
        server.base_url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30,
        headers={"x-api-key": KEY})))
    server.engine.held = True
    try:
        chat.start()
        wait_until(lambda: server.ctx.queue.active == 1, what="the chat request admitted")
        r = client.post(MSGS, json=msg())
        _anthropic_error(r, 503, "overloaded_error")
        assert r.headers["retry-after"] == "1"
        with pytest.raises(anthropic.ServiceUnavailableError):  # which the SDK retries (a 5xx) after Retry-After
            anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0).messages.create(
                model="tiny-fake", max_tokens=4, messages=USER)
    finally:
        server.engine.held = False
        chat.join(30)
    assert results[0].status_code == 200


def test_models_in_both_shapes(server):
    sdk = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
    [info] = sdk.models.list().data
    assert info.id == server.ctx.model_name and info.type == "model" and info.created_at.year >= 2026
    assert sdk.models.retrieve(info.id).display_name == info.id
    openai_shape = httpx.get(server.base_url + "/v1/models", headers={"x-api-key": KEY}).json()
    assert openai_shape["object"] == "list" and openai_shape["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_nothing_left_behind_and_counted(client, server):
    wait_until(lambda: server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0, what="idle")
    metrics = client.get("/metrics").text
    assert 'route="/v1/messages",status="200"' in metrics and 'route="/v1/messages",status="400"' in metrics
    assert 'route="/v1/messages/count_tokens",status="404"' in metrics
    assert 'status="500"' not in metrics and 'status="422"' not in metrics


def _events(lines):
    """(event name, data) pairs read from an SSE line iterator, until it ends."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):])


def test_stream_disconnect_aborts_and_engine_fault_is_an_error_event(thread_server):
    with thread_server(engine={"max_model_len": MAX_MODEL_LEN, "step_s": 0.02}) as s:
        body = msg(max_tokens=100, stream=True, temperature=0)
        with httpx.stream("POST", s.base_url + MSGS, json=body, timeout=30) as r:
            for name, _ in _events(r.iter_lines()):
                if name == "content_block_delta":
                    break
        wait_until(lambda: s.engine.num_unfinished() == 0 and s.ctx.queue.active == 0, what="aborted")
        assert len(s.engine.aborted) == 1 and s.engine.used_blocks == 0
        with httpx.stream("POST", s.base_url + MSGS, json=body, timeout=30) as r:
            seen, last = [], {}
            for name, last in _events(r.iter_lines()):  # noqa: B007 - the last event is read after the loop
                seen.append(name)
                if name == "content_block_delta" and seen.count(name) == 1:
                    s.in_loop(s.engine.kill, "boom")
        assert seen[0] == "message_start" and seen[-1] == "error" and "message_stop" not in seen
        assert last["type"] == "error" and last["error"]["type"] == "api_error" and "boom" in last["error"]["message"]


def test_max_tokens_beyond_the_context_is_cut_to_fit(client):
    """As Anthropic's newer models do: the answer runs to the end of the context and says so (this prompt leaves
    two tokens, and the fake engine writes more than two before its eos)."""
    long = [{"role": "user", "content": "hi " * 40}]
    body = client.post(MSGS, json=msg(messages=long, max_tokens=10 * MAX_MODEL_LEN, temperature=0)).json()
    assert body["stop_reason"] == "model_context_window_exceeded", body
    assert body["usage"]["input_tokens"] + body["usage"]["output_tokens"] == MAX_MODEL_LEN
    assert client.post(MSGS, json=msg(messages=long, max_tokens=2, temperature=0)).json()["stop_reason"] == \
        "max_tokens"


def test_a_request_the_server_gives_up_on_ends_pause_turn(thread_server):
    """What a drain that ran out of time does to the requests still running (ServingContext.abort_all)."""
    import asyncio

    with thread_server(engine={"max_model_len": MAX_MODEL_LEN, "step_s": 0.02}) as s:
        s.engine.held = True
        results = []
        t = threading.Thread(target=lambda: results.append(httpx.post(s.base_url + MSGS, json=msg(), timeout=30)))
        t.start()
        wait_until(lambda: s.engine.num_unfinished() == 1, what="the request queued")
        s.in_loop(lambda: asyncio.ensure_future(s.ctx.abort_all()))
        t.join(30)
        body = results[0].json()
        assert body["stop_reason"] == "pause_turn" and body["content"] == [], body
