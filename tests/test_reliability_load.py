"""Load through the real server process on the tiny checkpoint: concurrent streaming clients with mixed parameters,
a quarter of them hanging up at random points, a KV cache small enough that the scheduler must preempt; then
SIGTERM while a batch of streams is in flight.

The full-size run (256 clients) is `python bench/soak_load.py`; this is its short version for the normal suite.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from tests.service_fixtures import ServerProcess, sse_data, wait_until
from tests.soak.load import metric_values, rss_bytes, run_load, wait_idle
from tests.soak.servers import SERVER_ENV

pytestmark = [pytest.mark.slow, pytest.mark.server]
CLIENTS = 32
# 64 blocks of 16 tokens for up to 16 sequences of up to ~100 tokens (n up to 3): running requests get preempted
SERVER_ARGS = ["--device", "cpu", "--max-model-len", "512", "--kv-cache-tokens", "1024", "--max-num-seqs", "16",
               "--shutdown-timeout", "120"]
RSS_GROWTH_LIMIT = 128 * 2**20  # after a warm-up run; bench/soak_load.py measures the real figure


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_glm_ckpt):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--model", str(tiny_glm_ckpt), *SERVER_ARGS], log, env=SERVER_ENV) as s:
        yield s


def _describe(report) -> str:
    lines = [json.dumps(report.summary())]
    lines += [f"{o.path} {json.dumps(o.request)} -> {o.status}: {o.problems}" for o in report.failures[:5]]
    return "\n".join(lines)


def test_load_with_hang_ups_preemption_and_no_leaks(server):
    warm = asyncio.run(run_load(server.base_url, CLIENTS, duration_s=3, seed=1))
    assert not warm.failures, _describe(warm)
    wait_idle(server.base_url)
    rss_before = rss_bytes(server.proc.pid)
    before = metric_values(server.base_url)

    report = asyncio.run(run_load(server.base_url, CLIENTS, duration_s=10, seed=2))
    assert not report.failures, _describe(report)
    statuses = report.statuses()
    assert set(statuses) <= {200, None}, statuses  # None: cancelled before the headers came
    # every client's first request is in the run, and the seeded draw hangs up about a quarter of them
    assert len(report.completed) >= CLIENTS // 2 and report.hung_up, report.summary()

    after = wait_idle(server.base_url)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after["glm_serve:" + gauge] == 0, (gauge, after["glm_serve:" + gauge])
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["glm_serve:num_preemptions_total"] > 0, "the cache was meant to be too small for the batch"
    assert delta.get("glm_serve:request_success_total{finished_reason=error}", 0) == 0
    assert delta.get("glm_serve:request_success_total{finished_reason=abort}", 0) > 0  # hang-ups were aborted
    assert not any(k.startswith("glm_serve:http_requests_total{") and "status=5" in k and v for k, v in delta.items())
    growth = rss_bytes(server.proc.pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.0f} MiB over {len(report.outcomes)} requests"


def test_sigterm_under_load_drains_every_stream(server):
    """Last in this module: the server exits. Every stream in flight at SIGTERM runs to its end."""
    n_streams = 24
    results: list[list[str] | str] = [""] * n_streams
    started = threading.Barrier(n_streams + 1, timeout=120)

    def stream(i: int) -> None:
        body = {"prompt": f"stream {i}", "max_tokens": 40, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if i % 3 == 0:
            body.update(n=2, temperature=0.7, seed=i)
        try:
            with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=180) as r:
                started.wait()
                results[i] = sse_data(r.read().decode()) if r.status_code == 200 else f"HTTP {r.status_code}"
        except Exception as e:  # recorded, asserted below
            results[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    started.wait()  # every request has its response headers: admitted, in the engine
    server.terminate()
    late: list[httpx.Response] = []

    def refused() -> bool:
        late.append(httpx.post(server.base_url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}))
        return late[-1].status_code == 503

    wait_until(refused, what="a new request refused after SIGTERM")
    assert late[-1].json()["error"]["code"] == "draining"
    for t in threads:
        t.join(180)
    for i, events in enumerate(results):
        assert isinstance(events, list), (i, events)
        assert events[-1] == "[DONE]", (i, events[-3:])
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), (i, chunks[-2:])
        reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert reasons == ["length"] * (2 if i % 3 == 0 else 1), (i, reasons)
        assert chunks[-1]["usage"]["completion_tokens"] == 40 * (2 if i % 3 == 0 else 1)
    assert server.proc.wait(60) == 0
