"""API keys on /v1/*, /tokenize, /detokenize (several keys, constant-time compare); probes open; CORS opt-in."""

from __future__ import annotations

import httpx
import openai
import pytest

from service.api.auth import APIKeyMiddleware, is_protected

KEYS = ["key-one", "key-two"]
ORIGIN = "https://ui.example.com"


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(api_key=KEYS, cors_origins=[ORIGIN]) as s:
        yield s


PROTECTED = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("POST", "/tokenize", {"prompt": "hi"}),
             ("POST", "/detokenize", {"tokens": [5]})]


@pytest.mark.parametrize("method,path,body", PROTECTED)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic key-one", "Bearer", "bearer key-one", "Bearer key-one",
                                  "Bearer key-two"])
def test_protected_routes(server, method, path, body, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, server.base_url + path, json=body, headers=headers)
    if auth in ("Bearer key-one", "Bearer key-two", "bearer key-one"):
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 401
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        assert "key-one" not in r.text


def test_unknown_v1_route_needs_key_first(server):
    assert httpx.get(server.base_url + "/v1/nothing").status_code == 401
    assert httpx.get(server.base_url + "/v1/nothing", headers={"Authorization": "Bearer key-one"}).status_code == 404


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_metrics_open(server, path):
    assert httpx.get(server.base_url + path).status_code == 200


def test_openai_sdk_with_keys(server):
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key="key-two", max_retries=0)
    assert good.models.list().data[0].id == server.ctx.model_name
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unauthorized_counted(server):
    text = httpx.get(server.base_url + "/metrics").text
    assert 'glm_serve:http_requests_total{method="GET",model_name="tiny-fake",route="unmatched",status="401"}' in text


def test_cors_preflight(server):
    ok = httpx.options(server.base_url + "/v1/chat/completions",
                       headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                "Access-Control-Request-Headers": "authorization,content-type"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(server.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    simple = httpx.get(server.base_url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer key-one"})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_protected_paths():
    assert is_protected("/v1/models") and is_protected("/v1") and is_protected("/tokenize")
    assert not is_protected("/health") and not is_protected("/metrics") and not is_protected("/v10")


def test_every_key_compared():
    """A match on the first key still compares the rest (no early exit to time)."""
    calls = []
    mw = APIKeyMiddleware(app=None, keys=["a", "b", "c"])
    import service.api.auth as auth

    real = auth.hmac.compare_digest
    auth.hmac.compare_digest = lambda x, y: calls.append(1) or real(x, y)
    try:
        assert mw._authorized(b"Bearer a")
        assert not mw._authorized(b"Bearer z")
    finally:
        auth.hmac.compare_digest = real
    assert len(calls) == 6
