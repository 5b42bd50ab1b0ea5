"""/v1/responses shares the chat endpoint's machinery (fake engine): auth, admission 503s with Retry-After,
disconnect-abort, drain, per-route metrics; streamed responses are stored; the store flags bound it."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from tests.engine_fixtures import until
from tests.service_fixtures import wait_until
from tests.soak.sse_check import typed_events_contract
from tests.test_api_admission import metric

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"input": "hi", "max_output_tokens": 3}


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(engine={"step_s": 0.01}, max_queue_size=1, retry_after=3, api_key=[KEY],
                       responses_store_size=2) as s:
        yield s


def _post(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/responses", json=body, headers=AUTH, timeout=30, **kw)


def _events(text: str) -> list[dict]:
    return [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in text.strip("\n").split("\n\n")]


def test_auth_is_required(server):
    assert httpx.post(server.base_url + "/v1/responses", json=BODY).status_code == 401
    assert httpx.get(server.base_url + "/v1/responses/resp_x").status_code == 401
    assert httpx.delete(server.base_url + "/v1/responses/resp_x", headers={"Authorization": "Bearer no"}
                        ).status_code == 401


def test_streamed_response_is_stored_and_routes_are_counted(server):
    before = metric(server.base_url, "glm_serve:http_requests_total", route="/v1/responses", status="200")
    r = _post(server, {**BODY, "stream": True, "metadata": {"run": "1"}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    typed_events_contract(r.text, complete=True)  # the fuzz run's stream check, on a stream known to be right
    final = _events(r.text)[-1]["response"]
    got = httpx.get(server.base_url + f"/v1/responses/{final['id']}", headers=AUTH)
    assert got.status_code == 200 and got.json() == final and final["metadata"] == {"run": "1"}
    assert metric(server.base_url, "glm_serve:http_requests_total", route="/v1/responses", status="200") \
        - before == 1
    assert metric(server.base_url, "glm_serve:http_requests_total", route="/v1/responses/{response_id}",
                  status="200") >= 1


def test_store_keeps_the_most_recent(server):
    ids = [_post(server, BODY).json()["id"] for _ in range(3)]  # --responses-store-size 2
    found = [httpx.get(server.base_url + f"/v1/responses/{i}", headers=AUTH).status_code for i in ids]
    assert found == [404, 200, 200]
    deleted = httpx.delete(server.base_url + f"/v1/responses/{ids[1]}", headers=AUTH)
    assert deleted.json() == {"id": ids[1], "object": "response", "deleted": True}
    assert httpx.get(server.base_url + f"/v1/responses/{ids[1]}", headers=AUTH).status_code == 404


def test_queue_full_503_with_retry_after(server):
    server.engine.held = True

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30, headers=AUTH) as c:
            tasks = [asyncio.create_task(c.post("/v1/responses", json=BODY)) for _ in range(6)]
            await until(lambda: server.ctx.queue.waiting >= 1 and len([t for t in tasks if t.done()]) >= 5)
            server.engine.held = False
            return await asyncio.gather(*tasks)

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200] + [503] * 5
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "queue_full" for r in refused)
    wait_until(lambda: server.ctx.queue.active == 0)


def test_disconnect_aborts_the_request(server):
    server.engine.held = True
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({**BODY, "stream": True}).encode()
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: server.engine.num_unfinished() == 1)
        sock.close()
        wait_until(lambda: server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0)
    finally:
        server.engine.held = False


def test_draining_refuses_new_responses(thread_server):
    with thread_server() as s:
        s.ctx.queue.begin_drain()
        r = httpx.post(s.base_url + "/v1/responses", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and "retry-after" in r.headers


def test_store_size_zero_keeps_nothing(thread_server):
    with thread_server(responses_store_size=0) as s:
        r = httpx.post(s.base_url + "/v1/responses", json=BODY).json()
        assert r["store"] is True
        assert httpx.get(s.base_url + f"/v1/responses/{r['id']}").status_code == 404
        again = httpx.post(s.base_url + "/v1/responses", json={**BODY, "previous_response_id": r["id"]})
        assert again.status_code == 400 and again.json()["error"]["code"] == "previous_response_not_found"
