"""Security through HTTP: API keys on every protected route (streaming included, checked before the body is read, no
bypass through path spellings); chat templates from a checkpoint render sandboxed (escape attempts are a 400 and
run nothing); no stack traces, file paths or prompts in responses or in the default logs (and no forged log
lines); the body size limit on every POST route. (Templates in isolation: tests/test_tokenizer.py.)
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest

from service.api.auth import is_protected
from service.api.routes import router
from service.engine.outputs import CompletionOutput, RequestOutput
from tests.service_fixtures import FakeAsyncEngine, ServerProcess, sse_data

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 2048
MSG = [{"role": "user", "content": "hi"}]
OPEN = {"/health", "/ready", "/metrics", "/"}
BODIES = {"/v1/chat/completions": {"messages": MSG, "max_tokens": 2},
          "/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/tokenize": {"prompt": "hi"},
          "/detokenize": {"tokens": [5]}, "/v1/messages": {"messages": MSG, "max_tokens": 2},
          "/v1/messages/count_tokens": {"messages": MSG}, "/v1/responses": {"input": "hi", "max_output_tokens": 2}}


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(api_key=[KEY], max_request_body_bytes=LIMIT) as s:
        yield s


def _routes() -> list[tuple[str, str]]:
    return sorted((r.path.replace("{model_id:path}", "MODEL"), m) for r in router.routes for m in r.methods
                  if m != "HEAD")


# -- API keys -------------------------------------------------------------------------------------------------------
def test_every_route_is_either_protected_or_a_probe():
    for path, _ in _routes():
        assert is_protected(path) != (path in OPEN), path
    assert {p for p, _ in _routes() if is_protected(p)} >= set(BODIES) | {"/v1/models", "/v1/models/MODEL"}


@pytest.mark.parametrize("path,method", [r for r in _routes() if is_protected(r[0])])
def test_protected_route_needs_the_key(server, path, method):
    url = server.base_url + path.replace("MODEL", server.ctx.model_name)
    body = BODIES.get(path)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": "wrong"},
                    {"X-API-Key": f"Bearer {KEY}"}):
        r = httpx.request(method, url, json=body, headers=headers)
        error = r.json()["error"]
        anthropic = path.startswith("/v1/messages")  # Anthropic's shape there
        assert r.status_code == 401 and (error["type"] == "authentication_error" if anthropic else
                                         error["code"] == "invalid_api_key"), (headers, r.text)
        assert KEY not in r.text
    assert httpx.request(method, url + f"?api_key={KEY}", json=body).status_code == 401  # not from the query
    allowed = 404 if "{response_id}" in path else 200  # past the key: no response is stored under that id
    assert httpx.request(method, url, json=body, headers=AUTH).status_code == allowed
    assert httpx.request(method, url, json=body, headers={"X-API-Key": KEY}).status_code == allowed  # Anthropic's


@pytest.mark.parametrize("path", sorted(OPEN))
def test_probes_are_open(server, path):
    assert httpx.get(server.base_url + path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_needs_the_key(server, path):
    body = {**BODIES[path], "stream": True}
    refused = httpx.post(server.base_url + path, json=body)
    assert refused.status_code == 401 and refused.headers["content-type"].startswith("application/json")
    ok = httpx.post(server.base_url + path, json=body, headers=AUTH)
    assert ok.status_code == 200 and sse_data(ok.text)[-1] == "[DONE]"


def test_key_is_checked_before_the_body(server):
    """Without a key nothing about the body is looked at: no parse errors, no size errors, no engine work."""
    url = server.base_url + "/v1/completions"
    for content in (b"{not json", b'{"prompt": "' + b"x" * (4 * LIMIT) + b'"}', b'{"prompt": [1e999]}'):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
    assert server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0


@pytest.mark.parametrize("path", ["/v1/models/", "//v1/models", "/v1//models", "/V1/models", "/%76%31/models",
                                  "/v1/models%2F", "/tokenize/", "/v1/./models", "/v1/../v1/models"])
def test_no_path_spelling_bypasses_the_key(server, path):
    with httpx.Client(base_url=server.base_url, follow_redirects=True) as c:
        r = c.get(path)
        assert r.status_code in (401, 404, 405), (path, r.status_code, r.text)
        assert "data" not in r.text  # never the model list


# -- body size ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(BODIES))
def test_body_limit_on_every_post_route(server, path):
    big = {**BODIES[path], "pad": "x" * (2 * LIMIT)}
    r = httpx.post(server.base_url + path, json=big, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 413 and error.get("code", error["type"]) == "request_too_large"  # Anthropic's: a type

    def chunks():  # no Content-Length: the limit holds while reading
        yield json.dumps(BODIES[path])[:-1].encode() + b', "pad": "'
        for _ in range(8):
            yield b"x" * LIMIT
        yield b'"}'

    r = httpx.post(server.base_url + path, content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


# -- chat templates from a checkpoint -------------------------------------------------------------------------------
ESCAPES = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('MARKER', 'w').write('x') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "{{ strftime_now.__globals__['__builtins__']['exec']('open(\"MARKER\", \"w\")') }}",
    "{{ messages[0].content.format.__globals__ }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('touch MARKER') }}",
    "{{ messages.append(1) }}{{ messages.pop() }}",
    "{{ tools.__setitem__(0, 1) }}",
    "{% for i in range(10 ** 9) %}{% endfor %}",
]


@pytest.fixture(scope="module")
def hostile_template_server(tmp_path_factory, fake_model_dir, thread_server):
    """A checkpoint whose chat template runs escape attempt i when the last message says `escape i`."""
    root = tmp_path_factory.mktemp("hostile")
    model_dir = root / "hostile-ckpt"
    shutil.copytree(fake_model_dir, model_dir)
    marker = root / "MARKER"
    branches = "".join(f"{{%- elif c == 'escape {i}' -%}}{e.replace('MARKER', str(marker))}"
                       for i, e in enumerate(ESCAPES))
    template = ("{%- set c = messages[-1].content -%}{%- if c == 'benign' -%}<|user|>\n{{ c }}<|assistant|>\n"
                + branches + "{%- else -%}{{ raise_exception('unexpected') }}{%- endif -%}")
    (model_dir / "chat_template.jinja").write_text(template)
    with thread_server(model_dir=model_dir) as s:
        yield s, marker


@pytest.mark.parametrize("i", range(len(ESCAPES)), ids=[e[:40] for e in ESCAPES])
def test_template_escape_is_a_400_and_runs_nothing(hostile_template_server, i):
    server, marker = hostile_template_server
    messages = [{"role": "user", "content": f"escape {i}"}]
    for path, body in (("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "stream": True}),
                       ("/tokenize", {"messages": messages})):
        r = httpx.post(server.base_url + path, json=body, timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_messages" and "Traceback" not in r.text
        assert str(marker.parent) not in r.text and "site-packages" not in r.text
    assert not marker.exists()


def test_benign_request_to_the_hostile_checkpoint_works(hostile_template_server):
    server, _ = hostile_template_server
    r = httpx.post(server.base_url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "benign"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_missing_chat_template_names_no_path(tmp_path, fake_model_dir, thread_server):
    model_dir = tmp_path / "no-template"
    shutil.copytree(fake_model_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with thread_server(model_dir=model_dir) as s:
        r = httpx.post(s.base_url + "/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert str(tmp_path) not in r.text and "no-template" not in r.text


# -- what responses and logs reveal ---------------------------------------------------------------------------------
class _FailingEngine(FakeAsyncEngine):
    """Fails requests the way a buggy engine might: an exception naming a file, or a mid-stream step error."""

    async def generate(self, request_id, prompt_token_ids, params):
        if params.max_tokens == 7:
            raise RuntimeError("boom in /opt/secret/engine/step.py line 12")
        if params.max_tokens == 8:
            yield RequestOutput(request_id, [CompletionOutput(0, "a", [5])], False)
            yield RequestOutput(request_id, [CompletionOutput(0, "", [], finish_reason="error")],
                                True, error="RuntimeError: CUDA error at /opt/secret/aten/kernel.cu:42\nmore detail")
            return
        async for out in super().generate(request_id, prompt_token_ids, params):
            yield out


def test_server_errors_reveal_no_traceback_or_path(fake_model_dir, thread_server):
    with thread_server(engine=_FailingEngine(fake_model_dir)) as s:
        r = httpx.post(s.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 7})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r2 = httpx.post(s.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True})
        events = sse_data(r2.text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
        r3 = httpx.post(s.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8})
        assert r3.status_code == 500 and r3.json()["error"]["code"] == "engine_error"
        for resp in (r, r2, r3):
            assert "/opt/secret" not in resp.text and "Traceback" not in resp.text and ".py" not in resp.text
            assert "more detail" not in resp.text  # only the first line of an engine error
        assert "CUDA error" in r2.text  # the useful part of the engine's message stays
        assert httpx.get(s.base_url + "/health").status_code == 200


@pytest.mark.server
def test_default_logs_hold_no_prompts_and_no_forged_lines(tmp_path, fake_model_dir):
    marker = "zebra-7731"
    with ServerProcess(["--model", str(fake_model_dir)], tmp_path / "log",
                       module="tests.service_fixtures") as s:
        url = s.base_url
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": marker}],
                                                       "max_tokens": 3})
        httpx.post(url + "/v1/completions", json={"prompt": marker, "max_tokens": 3, "stream": True,
                                                  "stop": [marker]})
        httpx.post(url + "/v1/completions", json={"prompt": marker, "temperature": -1})  # a 400
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": marker}]})
        httpx.post(url + "/tokenize", json={"prompt": marker})
        httpx.post(url + "/v1/completions", json={"prompt": marker * 400, "max_tokens": 5})  # context length
        httpx.get(url + "/v1/models/a%0A2026-01-01%2000:00:00,000%20ERROR%20forged%0Db")
        httpx.get(url + "/nothing%0Aforged-line")
    log = s.log()  # after shutdown: the access line of the last request is written after its response
    assert marker not in log
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines), \
        [line for line in lines if not re.match(r"\d{4}-", line)]
    assert "completed" in log  # the log is not simply empty

