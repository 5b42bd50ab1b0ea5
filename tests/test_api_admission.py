"""Admission and cancellation with the fake engine: overload 503s, draining, client disconnects."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_fixtures import until
from tests.service_fixtures import wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(engine={"step_s": 0.01}, max_queue_size=1, retry_after=3) as s:
        yield s


def test_queue_full_503_with_retry_after(server):
    """Queue size 1, twelve concurrent requests, engine frozen: one admitted, eleven refused, none a 500."""
    server.engine.held = True
    before = metric(server.base_url, "glm_serve:admission_rejections_total", reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v1/chat/completions",
                                                json={"messages": MESSAGES, "max_tokens": 3})) for _ in range(12)]
            await until(lambda: server.ctx.queue.waiting >= 1 and len([t for t in tasks if t.done()]) >= 11)
            server.engine.held = False
            return await asyncio.gather(*tasks)

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [503] * 11
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "queue_full"
    assert metric(server.base_url, "glm_serve:admission_rejections_total", reason="queue_full") - before == 11
    assert server.ctx.queue.active == 0 and server.ctx.queue.waiting == 0


def test_queue_counts_only_waiting(server):
    """A request that has its first token no longer holds a queue place: a second one is admitted."""
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                      json={"messages": MESSAGES, "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        wait_until(lambda: server.ctx.queue.waiting == 0)
        second = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert second.status_code == 200
        r.read()


def test_streaming_disconnect_aborts_and_frees_cache(server):
    before = metric(server.base_url, "glm_serve:request_success_total", finished_reason="abort")
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                          json={"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break  # leaving the block closes the connection mid-stream
    wait_until(lambda: metric(server.base_url, "glm_serve:num_requests_running") == 0
             and metric(server.base_url, "glm_serve:kv_cache_usage_perc") == 0)
    assert server.engine.num_unfinished() == 0 and server.engine.used_blocks == 0
    assert metric(server.base_url, "glm_serve:request_success_total", finished_reason="abort") - before == 3
    assert server.ctx.queue.active == 0 and not server.ctx.inflight


def test_multi_prompt_stream_disconnect_aborts_every_prompt(server):
    n_aborted = len(server.engine.aborted)
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=30,
                      json={"prompt": ["a", "b", "c"], "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    wait_until(lambda: server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0)
    assert len(server.engine.aborted) == n_aborted + 3 and server.engine.used_blocks == 0


def test_non_streaming_disconnect_aborts(server):
    n_aborted = len(server.engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", timeout=0.3,
                   json={"prompt": "hello", "max_tokens": 200, "ignore_eos": True})
    wait_until(lambda: server.engine.num_unfinished() == 0)
    assert len(server.engine.aborted) == n_aborted + 1 and server.engine.used_blocks == 0
    wait_until(lambda: server.ctx.queue.active == 0)


def test_disconnect_before_first_token(server):
    """Hang up while the request still waits in the (frozen) engine: it is aborted, its ticket returned."""
    server.engine.held = True
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: server.engine.num_unfinished() == 1)
        sock.close()
        wait_until(lambda: server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0)
    finally:
        server.engine.held = False


def test_draining_refuses_new_requests(thread_server):
    with thread_server() as s:
        s.ctx.queue.begin_drain()
        assert httpx.get(s.base_url + "/ready").status_code == 503
        assert httpx.get(s.base_url + "/health").status_code == 200  # liveness holds while draining
        r = httpx.post(s.base_url + "/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and "retry-after" in r.headers
        assert metric(s.base_url, "glm_serve:admission_rejections_total", reason="draining") == 1
