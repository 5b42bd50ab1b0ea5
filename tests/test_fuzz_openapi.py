"""Schemathesis (v4) against the live /openapi.json: generated requests, positive and negative, for every
operation; no 5xx, status codes / content types / headers / bodies as documented (SSE events included), invalid
data refused, auth not ignored, and the SSE contract checked on every stream. A bounded run for the normal suite
(fake engine); `python bench/soak_fuzz.py` runs >= 1,000 cases against the real engine.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from service.api.routes import router
from tests.service_fixtures import FakeAsyncEngine
from tests.soak.sse_check import sse_contract

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth, unsupported_method, sse_contract]
EXAMPLES_PER_OPERATION = 15  # x 15 operations x (positive, negative)


@pytest.fixture(scope="module")
def server(thread_server):
    with thread_server(engine={"max_model_len": 128}, api_key=[KEY]) as s:
        yield s


OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/models/{model_id}",
              "POST /tokenize", "POST /detokenize", "GET /health", "GET /ready", "GET /metrics", "GET /",
              "POST /v1/responses", "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
              "POST /v1/messages", "POST /v1/messages/count_tokens"]


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    schema.config.max_stream_events = 100_000  # read every stream to its end (the default stops after 20 events)
    return schema


# schemathesis' own pytest plugin (`from_fixture`) does not run under pytest 9, so each operation and mode is a
# plain hypothesis test over the operation's strategy.
WITH_INPUT = OPERATIONS[:2] + OPERATIONS[3:6] + ["POST /v1/responses", "POST /v1/messages",
                                                "POST /v1/messages/count_tokens"]  # negative data needs input


@pytest.mark.parametrize("operation,mode", [(op, GenerationMode.POSITIVE) for op in OPERATIONS]
                         + [(op, GenerationMode.NEGATIVE) for op in WITH_INPUT])
def test_openapi_fuzz(api_schema, operation, mode):
    method, path = operation.split(" ", 1)
    op = api_schema[path][method]
    calls = []

    @given(op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case) -> None:
        calls.append(1)
        case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)

    run()
    assert calls


def test_every_operation_is_fuzzed(api_schema):
    assert sorted(f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()) == \
        sorted(OPERATIONS)


def test_document_describes_every_route_and_the_streams(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {(r.path.replace(":path}", "}"), m) for r in router.routes for m in r.methods if m != "HEAD"}
    assert served == documented
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
        ok = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"} and "itemSchema" in ok["text/event-stream"]
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"]  # FastAPI's default validation shape is never sent
            assert ("security" in op) == (path.startswith("/v1") or path in ("/tokenize", "/detokenize"))


def test_document_without_keys_asks_for_none(fake_model_dir):
    from service.api.app import build_app
    from service.settings import Settings

    app = build_app(Settings(model=fake_model_dir), FakeAsyncEngine(fake_model_dir), fake_model_dir, "m")
    doc = app.openapi()
    assert "securitySchemes" not in doc.get("components", {})
    assert not any("security" in op for ops in doc["paths"].values() for op in ops.values())
