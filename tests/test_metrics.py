"""/metrics: Prometheus text that prometheus-client's parser reads, vLLM's names and buckets under
`glm_serve:`, `model_name` on every series, and counters that match the requests made."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from service.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, ServiceMetrics, build_1_2_5_buckets
from tests.service_fixtures import FakeAsyncEngine, ServerThread, shared_fake_model_dir

MESSAGES = [{"role": "user", "content": "Count to ten."}]
DESIGN_NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                "prompt_tokens_total", "generation_tokens_total", "request_success_total",
                "admission_rejections_total", "time_to_first_token_seconds", "inter_token_latency_seconds",
                "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                "spec_decode_num_accepted_tokens_total", "spec_decode_num_accepted_tokens_per_pos_total",
                "dsa_tokens_read_total", "dsa_tokens_cached_total"]


def scrape(base_url: str) -> dict[str, list]:
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def run():
    """A fresh server; a known mix of requests; the usage they reported."""
    model_dir = shared_fake_model_dir()
    with ServerThread(FakeAsyncEngine(model_dir), model_dir) as s, httpx.Client(base_url=s.base_url) as c:
        prompt, completion, choices, engine_requests = 0, 0, 0, 0
        for n in (1, 2, 3):
            u = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 7, "n": n,
                                                     "temperature": 0.7, "seed": n}).json()["usage"]
            prompt, completion, choices, engine_requests = (prompt + u["prompt_tokens"],
                                                            completion + u["completion_tokens"], choices + n,
                                                            engine_requests + 1)
        for _ in range(2):
            r = c.post("/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 5, "stream": True,
                                                "stream_options": {"include_usage": True}})
            u = [line for line in r.text.split("\n\n") if '"usage"' in line][-1]
            usage = json.loads(u[len("data: "):])["usage"]
            prompt, completion, choices, engine_requests = (prompt + usage["prompt_tokens"],
                                                            completion + usage["completion_tokens"], choices + 2,
                                                            engine_requests + 2)
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert c.get("/v1/nope").status_code == 404
        yield s, scrape(s.base_url), dict(prompt=prompt, completion=completion, choices=choices,
                                          engine_requests=engine_requests)


def test_design_names_present_with_model_name(run):
    s, samples, _ = run
    names = {name.removeprefix("glm_serve:") for name in samples}
    for name in DESIGN_NAMES:
        if name.endswith("_per_pos_total"):
            continue  # no series until speculative decoding ran (one per draft position)
        stem = name
        assert stem in names or stem + "_count" in names, name
    for name, group in samples.items():
        assert name.startswith("glm_serve:"), name
        assert all(smp.labels.get("model_name") == s.ctx.model_name for smp in group), name


def test_counters_match_requests(run):
    _, samples, made = run
    assert total(samples, "glm_serve:prompt_tokens_total") == made["prompt"]
    assert total(samples, "glm_serve:generation_tokens_total") == made["completion"]
    assert total(samples, "glm_serve:request_success_total") == made["choices"]
    assert total(samples, "glm_serve:request_success_total", finished_reason="abort") == 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens"):
        assert total(samples, f"glm_serve:{hist}_count") == made["engine_requests"], hist
    assert total(samples, "glm_serve:request_generation_tokens_sum") == made["completion"]
    http = "glm_serve:http_requests_total"
    assert total(samples, http, route="/v1/chat/completions", status="200") == 3
    assert total(samples, http, route="/v1/completions", status="200") == 2
    assert total(samples, http, route="/v1/chat/completions", status="400") == 1
    assert total(samples, http, route="unmatched", status="404") == 1


def test_engine_gauges_after_requests(run):
    _, samples, _ = run
    assert total(samples, "glm_serve:num_requests_running") == 0
    assert total(samples, "glm_serve:num_requests_waiting") == 0
    assert total(samples, "glm_serve:kv_cache_usage_perc") == 0


def test_vllm_buckets(run):
    _, samples, _ = run

    def bounds(name: str) -> list[float]:
        return [float(smp.labels["le"]) for smp in samples[f"glm_serve:{name}_bucket"] if smp.labels["le"] != "+Inf"]

    assert bounds("time_to_first_token_seconds") == TTFT_BUCKETS
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert bounds("inter_token_latency_seconds") == ITL_BUCKETS and ITL_BUCKETS[-1] == 80.0
    assert bounds("request_time_per_output_token_seconds") == ITL_BUCKETS
    assert bounds("e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    assert bounds("request_queue_time_seconds") == REQUEST_LATENCY_BUCKETS


def test_build_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(7) == [1, 2, 5]


def _families(metrics: ServiceMetrics) -> dict[str, list]:
    from prometheus_client import generate_latest

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_engine_collector_reads_stats_at_scrape_time():
    stats = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=4, spec_num_drafts=10,
                        spec_num_draft_tokens=30, spec_num_accepted_tokens=17, spec_accepted_per_pos=[9, 6, 2],
                        dsa_tokens_read=50, dsa_tokens_cached=200)
    m = ServiceMetrics("m", 1024, stats=lambda: stats)
    got = _families(m)
    assert total(got, "glm_serve:num_requests_running") == 3
    assert total(got, "glm_serve:num_requests_waiting") == 2
    assert total(got, "glm_serve:kv_cache_usage_perc") == 0.25
    assert total(got, "glm_serve:num_preemptions_total") == 4
    assert total(got, "glm_serve:spec_decode_num_accepted_tokens_total") == 17
    per_pos = {s.labels["position"]: s.value for s in got["glm_serve:spec_decode_num_accepted_tokens_per_pos_total"]}
    assert per_pos == {"0": 9, "1": 6, "2": 2}
    assert total(got, "glm_serve:dsa_read_fraction") == 0.25
    stats.num_running = 0  # read again on the next scrape, not cached
    assert total(_families(m), "glm_serve:num_requests_running") == 0


def test_broken_stats_do_not_break_the_scrape():
    def boom() -> EngineStats:
        raise RuntimeError("engine gone")

    got = _families(ServiceMetrics("m", 64, stats=boom))
    assert "glm_serve:prompt_tokens_total" in got and "glm_serve:num_requests_running" not in got


def test_recorder_ttft_itl_tpot():
    m = ServiceMetrics("m", 64)
    rec = m.recorder(3)
    outs = [RequestOutput("r", [CompletionOutput(0, "a", [5])], False, 1, queue_time_s=0.5),
            RequestOutput("r", [CompletionOutput(0, "b", [6, 7])], False, 3),
            RequestOutput("r", [CompletionOutput(0, "", [8], finish_reason="length")], True, 4)]
    for o in outs:
        rec.on_output(o)
    rec.finish(["length"])
    rec.finish(["length"])  # idempotent
    got = _families(m)
    assert total(got, "glm_serve:prompt_tokens_total") == 3
    assert total(got, "glm_serve:generation_tokens_total") == 4
    assert total(got, "glm_serve:inter_token_latency_seconds_count") == 2
    assert total(got, "glm_serve:request_time_per_output_token_seconds_count") == 1
    assert total(got, "glm_serve:request_queue_time_seconds_sum") == 0.5
    assert total(got, "glm_serve:request_success_total", finished_reason="length") == 1
