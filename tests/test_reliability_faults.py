"""Faults under load, through HTTP on the real engine (in a server thread, so the test reaches the engine's
test-only `fault_injector` hook): a step that raises fails exactly the requests of that step, each with an error
event and `[DONE]`, while the other streams finish and the server keeps serving; a dead engine loop fails every
in-flight request, turns /health and /ready to 503 and refuses new work with 503; request timeouts abort and free
everything. (Preemption under cache pressure and SIGTERM under load: test_reliability_load.py.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.service_fixtures import ServerThread, sse_data
from tests.soak.load import metric_values, wait_idle
from tests.soak.servers import real_engine, shared_tiny_checkpoint

pytestmark = pytest.mark.slow
ENGINE = {"max_model_len": 512, "max_num_seqs": 8, "kv_cache_tokens": 8192}


def _body(i: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if i % 2:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"request {i}"}],
                                        "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    return "/v1/completions", {"prompt": f"request {i}", "max_tokens": max_tokens, "ignore_eos": True,
                               "stream": True, "n": 1 + i % 3, "temperature": 0.5, "seed": i}


async def _streams(base_url: str, count: int, max_tokens: int, extra: list[tuple[str, dict]] | None = None
                   ) -> list[tuple[int, str, dict]]:
    """Run `count` mixed streams (plus `extra` requests) at once: [(status, raw body, request)]."""
    requests = [_body(i, max_tokens) for i in range(count)] + (extra or [])
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async def one(path: str, body: dict) -> tuple[int, str, dict]:
            r = await client.post(path, json=body)
            return r.status_code, r.text, body

        return await asyncio.gather(*(one(p, b) for p, b in requests))


def _choices(body: dict) -> int:
    return body.get("n", 1)


def test_step_fault_fails_only_that_steps_requests():
    engine = real_engine(shared_tiny_checkpoint(), **ENGINE)
    failed_ids: set[str] = set()
    steps = [0]

    def injector(sched) -> None:
        steps[0] += 1
        groups = {seq.group.request_id for seq, _ in sched.scheduled}
        streaming = all(seq.output_token_ids for seq, _ in sched.scheduled)  # each has sent its first token
        if not failed_ids and steps[0] >= 6 and streaming and 2 <= len(groups) < 8:  # some requests, not all
            failed_ids.update(groups)
            raise RuntimeError("injected step fault")

    with ServerThread(engine, shared_tiny_checkpoint()) as s:
        engine.fault_injector = injector
        results = asyncio.run(_streams(s.base_url, 12, 40))
        engine.fault_injector = None
        assert failed_ids, "the fault never fired"
        failed, finished = [], []
        for status, raw, body in results:
            assert status == 200, raw
            events = sse_data(raw)
            assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
            chunks = [json.loads(e) for e in events[:-1]]
            errors = [c for c in chunks if "error" in c]
            # The stream's id is on its data chunks; when the fault's output coalesced with the request's first
            # tokens, the error event is the only chunk and carries none: such a stream can only be a failed one
            # (the count check below still catches any extra failure).
            ids = {c["id"] for c in chunks if "id" in c}
            if ids & failed_ids or (not ids and errors):
                assert len(errors) == 1 and chunks[-1] is errors[0], chunks[-2:]
                err = errors[0]["error"]
                assert err["code"] == "engine_error" and "injected step fault" in err["message"]
                failed.append(body)
            else:
                assert not errors, errors
                reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
                assert reasons == ["length"] * _choices(body), reasons
                finished.append(body)
        assert len(failed) == len(failed_ids) and finished  # exactly the step's requests failed
        # the engine and the server keep serving
        assert httpx.get(s.base_url + "/health").status_code == 200
        ok = httpx.post(s.base_url + "/v1/completions", json={"prompt": "after", "max_tokens": 5}, timeout=120)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        idle = wait_idle(s.base_url)
        assert idle["glm_serve:kv_cache_usage_perc"] == 0 and idle["glm_serve:num_requests_running"] == 0
        assert idle["glm_serve:request_success_total{finished_reason=error}"] == sum(_choices(b) for b in failed)
        assert s.ctx.queue.active == 0 and not s.ctx.inflight


def test_dead_engine_loop_fails_in_flight_and_health_turns_503():
    engine = real_engine(shared_tiny_checkpoint(), **ENGINE)
    with ServerThread(engine, shared_tiny_checkpoint()) as s:
        steps = [0]
        step = engine.local_engine.step

        def counting_step():
            steps[0] += 1
            return step()

        engine.local_engine.step = counting_step
        plain = ("/v1/completions", {"prompt": "non-streaming", "max_tokens": 200, "ignore_eos": True})
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(asyncio.run(_streams(s.base_url, 6, 200, [plain]))))
        runner.start()
        deadline = time.monotonic() + 120
        while steps[0] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)

        def broken():
            raise MemoryError("simulated unrecoverable engine failure")

        engine.local_engine.step = broken  # outside the step's own error handling: the loop dies
        runner.join(120)
        assert len(results) == 7
        mid_stream = 0
        for status, raw, body in results:
            if status == 503:  # non-streaming, or a stream still waiting for its first token
                assert json.loads(raw)["error"]["code"] == "engine_dead", raw
                continue
            assert status == 200 and body.get("stream"), raw
            events = sse_data(raw)
            assert events[-1] == "[DONE]"
            assert "simulated unrecoverable" in json.loads(events[-2])["error"]["message"]
            mid_stream += 1
        assert mid_stream >= 4
        health = httpx.get(s.base_url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert httpx.get(s.base_url + "/ready").status_code == 503
        refused = httpx.post(s.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert "retry-after" in refused.headers
        assert s.ctx.queue.active == 0 and not s.ctx.inflight
        assert metric_values(s.base_url)["glm_serve:request_success_total{finished_reason=error}"] >= 6


def test_request_timeouts_under_load_abort_and_free():
    engine = real_engine(shared_tiny_checkpoint(), **ENGINE)
    with ServerThread(engine, shared_tiny_checkpoint(), request_timeout=0.5) as s:
        plain = [("/v1/chat/completions", {"messages": [{"role": "user", "content": f"plain {i}"}],
                                           "max_tokens": 480, "ignore_eos": True}) for i in range(4)]
        results = asyncio.run(_streams(s.base_url, 10, 480, plain))
        for status, raw, body in results:
            if status == 200:  # a stream that had started: the error event, then [DONE]
                assert body.get("stream"), raw
                events = sse_data(raw)
                assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
            else:  # non-streaming, or a stream that timed out waiting for its first token
                assert status == 504 and json.loads(raw)["error"]["code"] == "request_timeout", raw
        idle = wait_idle(s.base_url)
        assert idle["glm_serve:num_requests_running"] == 0 and idle["glm_serve:num_requests_waiting"] == 0
        assert idle["glm_serve:kv_cache_usage_perc"] == 0
        assert engine.num_unfinished() == 0 and s.ctx.queue.active == 0 and not s.ctx.inflight
        aborted = idle["glm_serve:request_success_total{finished_reason=abort}"]
        assert aborted == sum(_choices(b) for _, _, b in results)  # every choice of every request
        assert httpx.get(s.base_url + "/health").status_code == 200
