"""Hostile input against a server process with the default limits (8 MiB bodies): multi-megabyte strings, a
million token ids, 20,000-deep nesting, broken Unicode, NaN/Infinity, absurd numbers, 10,000 stop strings, wrong
content types, header abuse. Each gets a 4xx in OpenAI's error shape within a bounded time (the client's timeout),
the server's peak RSS stays bounded, nothing is logged as a crash, and the server keeps serving.

The server runs the fake engine (tests.service_fixtures) so its RSS is the API layer's alone; tokenizer, chat
template and every check before the engine are the real ones.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import select
import socket
from collections.abc import Callable

import httpx
import pytest

from tests.service_fixtures import ServerProcess
from tests.soak.load import metric_values

pytestmark = pytest.mark.server
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
JSON = {"content-type": "application/json"}
MiB = 2**20
PEAK_RSS_GROWTH_LIMIT = 256 * MiB  # the whole battery peaks ~150 MiB over the baseline (RELIABILITY.md)


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _deep(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def _deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _chat(**kw: object) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


def _comp(**kw: object) -> dict:
    return {"prompt": "hi", "max_tokens": 4, **kw}


HUGE_TEXT = "ab " * 700_000  # 2.1 MB
# (id, path, body factory, extra headers, status, param or None, code or None)
CASES: list[tuple[str, str, Callable[[], bytes], dict[str, str], int, str | None, str | None]] = [
    ("2mb-prompt", COMP, lambda: _j(_comp(prompt=HUGE_TEXT)), {}, 400, "prompt", "context_length_exceeded"),
    ("2mb-chat-content", CHAT, lambda: _j({"messages": [{"role": "user", "content": HUGE_TEXT}]}), {}, 400,
     "messages", "context_length_exceeded"),
    ("100k-messages", CHAT, lambda: _j({"messages": [{"role": "user", "content": "hi"}] * 100_000}), {}, 400,
     "messages", "context_length_exceeded"),
    ("2mb-model-name", CHAT, lambda: _j(_chat(model="m" * 2_000_000)), {}, 404, "model", "model_not_found"),
    ("2mb-stop-string", COMP, lambda: _j(_comp(stop=HUGE_TEXT)), {}, 400, "stop", None),
    ("10k-stop-strings", COMP, lambda: _j(_comp(stop=[f"s{i}" for i in range(10_000)])), {}, 400, "stop", None),
    ("million-token-ids", COMP, lambda: _j(_comp(prompt=[7] * 1_000_000)), {}, 400, "prompt",
     "context_length_exceeded"),
    ("1000x1000-token-ids", COMP, lambda: _j(_comp(prompt=[[7] * 1000] * 1000)), {}, 400, "prompt",
     "context_length_exceeded"),
    ("million-stop-token-ids", COMP, lambda: _j(_comp(stop_token_ids=[7] * 1_000_000)), {}, 400, "stop_token_ids",
     None),
    ("20000-deep-array", COMP, lambda: b'{"prompt": ' + _deep(20_000) + b"}", {}, 400, None, None),
    ("20000-deep-object", CHAT, lambda: b'{"messages": ' + _deep_object(20_000) + b"}", {}, 400, None, None),
    ("500-deep-template-kwargs", CHAT, lambda: _j(_chat())[:-1] + b', "chat_template_kwargs": {"x": '
     + _deep(500) + b"}}", {}, 400, None, None),
    ("500-deep-tools", CHAT, lambda: _j(_chat())[:-1] + b', "tools": [{"x": ' + _deep(500) + b"}]}", {}, 400, None,
     None),
    ("500-deep-message-extra", CHAT, lambda: b'{"messages": [{"role": "user", "content": "hi", "x": '
     + _deep(500) + b"}]}", {}, 400, None, None),
    ("invalid-utf8", COMP, lambda: b'{"prompt": "\xff\xfe"}', {}, 400, None, None),
    ("overlong-utf8", COMP, lambda: b'{"prompt": "\xc0\xaf"}', {}, 400, None, None),
    ("utf8-encoded-surrogate", COMP, lambda: b'{"prompt": "\xed\xa0\x80"}', {}, 400, None, None),
    ("lone-surrogate-escape", COMP, lambda: b'{"prompt": "a\\ud800b"}', {}, 400, None, None),
    ("lone-surrogate-chat", CHAT, lambda: b'{"messages": [{"role": "user", "content": "\\udfff"}]}', {}, 400, None,
     None),
    ("lone-surrogate-model", COMP, lambda: b'{"prompt": "hi", "model": "\\udc00"}', {}, 400, None, None),
    ("lone-surrogate-stop", COMP, lambda: b'{"prompt": "hi", "stop": ["\\ud800"]}', {}, 400, None, None),
    ("lone-surrogate-key", COMP, lambda: b'{"prompt": "hi", "\\ud800": 1}', {}, 400, None, None),
    ("lone-surrogate-tokenize", "/tokenize", lambda: b'{"prompt": "\\ud800"}', {}, 400, None, None),
    ("nan", CHAT, lambda: _j(_chat())[:-1] + b', "temperature": NaN}', {}, 400, None, None),
    ("minus-infinity", CHAT, lambda: _j(_chat())[:-1] + b', "presence_penalty": -Infinity}', {}, 400, None, None),
    ("nan-in-list", COMP, lambda: b'{"prompt": [1, NaN]}', {}, 400, None, None),
    ("1e999", COMP, lambda: b'{"prompt": "hi", "max_tokens": 1e999}', {}, 400, "max_tokens", None),
    ("n-billion", CHAT, lambda: _j(_chat(n=10**9)), {}, 400, "n", None),
    ("n-2-pow-64", COMP, lambda: _j(_comp(n=2**64)), {}, 400, "n", None),
    ("max-tokens-1e18", CHAT, lambda: _j(_chat(max_tokens=10**18)), {}, 400, "messages", "context_length_exceeded"),
    ("max-tokens-float", COMP, lambda: _j(_comp(max_tokens=1e18)), {}, 400, "max_tokens", None),
    ("logprobs-billion", COMP, lambda: _j(_comp(logprobs=10**9)), {}, 400, "logprobs", None),
    ("top-logprobs-billion", CHAT, lambda: _j(_chat(logprobs=True, top_logprobs=10**9)), {}, 400, "top_logprobs",
     None),
    ("best-of-billion", COMP, lambda: _j(_comp(best_of=10**9)), {}, 400, None, None),
    ("5000-digit-int", COMP, lambda: b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}", {}, 400, None, None),
    ("seed-1e30", COMP, lambda: _j(_comp(seed=10**30)), {}, 400, "seed", None),
    ("text-plain", COMP, lambda: _j(_comp()), {"content-type": "text/plain"}, 415, None, "unsupported_media_type"),
    ("form", COMP, lambda: b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, None,
     "unsupported_media_type"),
    ("multipart", CHAT, lambda: b"--x\r\n\r\nhi\r\n--x--", {"content-type": "multipart/form-data; boundary=x"}, 415,
     None, "unsupported_media_type"),
    ("xml", "/tokenize", lambda: b"<prompt>hi</prompt>", {"content-type": "application/xml"}, 415, None,
     "unsupported_media_type"),
    ("gzip-body", COMP, lambda: gzip.compress(_j(_comp())), {"content-encoding": "gzip"}, 400, None, None),
    ("lying-content-length", COMP, lambda: b'{"prompt": "hi"}', {"content-length": "99999999999"}, 413, None,
     "request_too_large"),  # sent raw: httpx would not send a wrong Content-Length
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_model_dir):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--model", str(fake_model_dir)], log, module="tests.service_fixtures") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        c.post(CHAT, json=_chat())  # warm up: the first request loads lazy code paths
        yield c


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def baseline_rss(server, client) -> int:
    return _status(server.proc.pid, "VmRSS")


def _check_error(r: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.content) < 4096, "an error response echoes the input back"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_body(server, client, baseline_rss, case):
    _, path, body, headers, status, param, code = case
    if "content-length" in headers:
        r = _raw_post(server.port, path, body(), headers)
    else:
        r = client.post(path, content=body(), headers={**JSON, **headers})
    _check_error(r, status, param, code)


def _raw_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    head = "".join(f"{k}: {v}\r\n" for k, v in {"host": "x", **JSON, **headers}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        return _read_response(sock)


def _read_response(sock: socket.socket) -> httpx.Response:
    """One HTTP/1.1 response with a Content-Length, read from a raw socket."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # reset after its answer, which the kernel has already handed over
            break
        if not chunk:
            break
        reply += chunk
    assert b"\r\n\r\n" in reply, f"no complete response head: {reply[:200]!r}"
    head_bytes, content = reply.split(b"\r\n\r\n", 1)
    lines = head_bytes.decode("latin-1").split("\r\n")
    return httpx.Response(int(lines[0].split(" ")[1]), headers=[tuple(x.split(": ", 1)) for x in lines[1:]],
                          content=content)


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_chunked_body_over_the_limit_is_413(server, client, baseline_rss):
    """9 MiB in chunks, no Content-Length: a 413 in OpenAI's shape, whether the server answers after the whole
    upload or cuts it short (then the client stops sending, or finds the connection closed under it, and reads
    the answer that came first), and the server serves on."""
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    head = f"POST {COMP} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    pieces = [chunk(b'{"prompt": "')] + [chunk(b"a" * (64 * 1024))] * (9 * 16) + [chunk(b'"}') + b"0\r\n\r\n"]
    before = metric_values(server.base_url).get(
        'glm_serve:http_requests_total{method=POST,route=/v1/completions,status=413}', 0.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode())
        try:
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed): stop uploading
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while the upload went on; its answer was sent before the close
        r = _read_response(sock)
    _check_error(r, 413, None, "request_too_large")
    after = metric_values(server.base_url)
    assert after['glm_serve:http_requests_total{method=POST,route=/v1/completions,status=413}'] == before + 1
    assert client.get("/health").status_code == 200


def test_valid_surrogate_pair_is_accepted(client):
    r = client.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers=JSON)  # an escaped emoji
    assert r.status_code == 200 and r.json()["count"] > 0


def test_abusive_request_id_is_not_echoed(client):
    for rid in ("x" * 10_000, "a b", "<script>", "ok\tid"):
        r = client.get("/health", headers={"x-request-id": rid})
        assert r.status_code == 200 and r.headers["x-request-id"] != rid and len(r.headers["x-request-id"]) == 32
    assert client.get("/health", headers={"x-request-id": "fine-id.1:2"}).headers["x-request-id"] == "fine-id.1:2"


# Malformed HTTP is refused by the HTTP parser (uvicorn/h11) before the app, with a plain-text 400 and a closed
# connection. Oversized header blocks: h11 refuses one that arrives in pieces over 16 KB, but parses one that
# arrives in a single read (up to the 256 KB a read returns), so /health may also answer 200: both are fine.
HEADER_FLOOD = {200, 400, 431}
RAW = [
    ("100kb-header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", HEADER_FLOOD),
    ("100k-headers", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100_000))
     + b"\r\n", HEADER_FLOOD),
    ("bad-content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", {400}),
    ("negative-content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
     {400}),
    ("conflicting-content-lengths", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                    b"Content-Length: 3\r\n\r\n{}", {400}),
    ("garbage-request-line", b"GARBAGE\r\n\r\n", {400}),
    ("non-ascii-target", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
]


@pytest.mark.parametrize("name,data,allowed", RAW, ids=[r[0] for r in RAW])
def test_malformed_http_is_refused(server, baseline_rss, name, data, allowed):
    reply = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                reply += chunk
        except ConnectionResetError:  # closed while our unread request bytes were still in its buffer
            pass
    if not reply:
        return  # refused by closing the connection; the health check at the end shows the server unharmed
    assert int(reply.split(b" ", 2)[1]) in allowed, reply[:200]


def test_server_healthy_bounded_and_quiet_afterwards(server, client, baseline_rss):
    """Runs after the battery (file order): still serving, no 5xx, bounded peak memory, no crash logged."""
    assert client.get("/health").status_code == 200
    ok = client.post(CHAT, json=_chat())
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = metric_values(server.base_url)
    assert not any(k.startswith("glm_serve:http_requests_total{") and "status=5" in k and v
                   for k, v in metrics.items())
    growth = _status(server.proc.pid, "VmHWM") - baseline_rss
    assert growth < PEAK_RSS_GROWTH_LIMIT, f"peak RSS {growth / MiB:.0f} MiB over the baseline"
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert "ab ab ab" not in log and "mmmmmmmm" not in log  # no request content in the log


def _reset_peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status(pid, "VmRSS")


def test_long_tokenizations_take_turns(server, baseline_rss):
    """Tokenizing a long text peaks at ~100x its size; concurrent ones run one at a time, so three at once peak
    no higher than one alone did (a /tokenize text has no context limit, so it is always tokenized)."""
    pid, body = server.proc.pid, {"prompt": "ab " * 200_000}
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        rss = _reset_peak_rss(pid)
        assert c.post("/tokenize", json=body).status_code == 200
        one = _status(pid, "VmHWM") - rss

    async def three() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as ac:
            return [r.status_code for r in await asyncio.gather(*(ac.post("/tokenize", json=body) for _ in range(3)))]

    rss = _reset_peak_rss(pid)
    assert asyncio.run(three()) == [200] * 3
    assert _status(pid, "VmHWM") - rss < one, (one / MiB, (_status(pid, "VmHWM") - rss) / MiB)
