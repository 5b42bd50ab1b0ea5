"""Prometheus metrics in vLLM's schema with the `glm_serve:` prefix (DESIGN.md §2), every series labelled
with `model_name`.

Two sources: per-request counters and histograms that the API layer records as outputs stream by
(`RequestRecorder`), and engine state (running/waiting, cache usage, preemptions, speculative decoding, DSA)
read from `engine.stats()` at scrape time by a custom collector, so the engine never calls into Prometheus.
Bucket boundaries are vLLM's, so its dashboards and alert rules work after renaming the prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.engine.outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)

PREFIX = "glm_serve:"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECTION_REASONS = ("queue_full", "draining")

disable_created_metrics()  # `*_created` series double the scrape size and no dashboard reads them


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(float(value))
        exponent += 1


class EngineCollector(Collector):
    """Engine gauges and cumulative counters, snapshotted from `stats()` on every scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # a dead or busy engine must not break the scrape of the other metrics
            log.exception("engine stats unavailable")
            return
        m = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting in the engine's queue.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV cache usage, 0 to 1.", s.kv_cache_usage)
        yield counter("num_preemptions", "Preemptions (recompute) since start.", s.num_preemptions)
        yield counter("spec_decode_num_drafts", "MTP draft runs.", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by draft position.", labels=["model_name", "position"])
        for pos, accepted in enumerate(s.spec_accepted_per_pos):
            per_pos.add_metric([self._model, str(pos)], accepted)
        yield per_pos
        yield counter("dsa_tokens_read", "Cached latents the sparse (DSA) attention read in decode.",
                      s.dsa_tokens_read)
        yield counter("dsa_tokens_cached", "Cached latents a dense attention would have read in decode.",
                      s.dsa_tokens_cached)
        share = s.dsa_tokens_read / s.dsa_tokens_cached if s.dsa_tokens_cached else 1.0
        yield gauge("dsa_read_fraction", "Share of cached latents DSA read, cumulative since start.", share)


class ServiceMetrics:
    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], EngineStats] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished sequences, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.admission_rejections = Counter(PREFIX + "admission_rejections", "Requests refused with 503.",
                                            ["model_name", "reason"], registry=r)
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by route and status.",
                                     ["model_name", "method", "route", "status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first output token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Gap between successive outputs.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds",
                              "(e2e - ttft) / (generated tokens - 1), per request.", m, buckets=ITL_BUCKETS,
                              registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last output.", m,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting in the engine queue.", m,
                                    buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Prompt length per request.", m,
                                               buckets=token_buckets, registry=r)
        self.request_generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                                   "Generated tokens per request.", m, buckets=token_buckets,
                                                   registry=r)
        for reason in FINISH_REASONS:  # series exist from the start, so rate() works before the first event
            self.request_success.labels(model_name, reason)
        for reason in REJECTION_REASONS:
            self.admission_rejections.labels(model_name, reason)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.tpot, self.e2e,
                       self.queue_time, self.request_prompt_tokens, self.request_generation_tokens):
            metric.labels(model_name)
        if stats is not None:
            self.registry.register(EngineCollector(model_name, stats))

    def rejected(self, reason: str) -> None:
        self.admission_rejections.labels(self.model_name, reason).inc()

    def http_request(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(self.model_name, method, route, str(status)).inc()

    def recorder(self, num_prompt_tokens: int) -> RequestRecorder:
        return RequestRecorder(self, num_prompt_tokens)


class RequestRecorder:
    """Timing and token counts of one engine request, fed each RequestOutput as it arrives."""

    def __init__(self, metrics: ServiceMetrics, num_prompt_tokens: int) -> None:
        self._m = metrics
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.num_generated = 0
        self.num_prompt = num_prompt_tokens
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        m, name, now = self._m, self._m.model_name, time.monotonic()
        if self.first is None:
            self.first = now
            m.prompt_tokens.labels(name).inc(self.num_prompt)
            m.ttft.labels(name).observe(now - self.arrival)
            if out.queue_time_s is not None:
                m.queue_time.labels(name).observe(out.queue_time_s)
        elif self.last is not None:
            m.itl.labels(name).observe(now - self.last)
        self.last = now
        delta = out.num_generated_tokens - self.num_generated
        if delta > 0:
            m.generation_tokens.labels(name).inc(delta)
            self.num_generated = out.num_generated_tokens

    def finish(self, finish_reasons: list[str]) -> None:
        """Once per engine request: one request_success per choice (vLLM v1 counts each of n as a request)."""
        if self.done:
            return
        self.done = True
        m, name = self._m, self._m.model_name
        for reason in finish_reasons:
            m.request_success.labels(name, reason).inc()
        if self.first is None or self.last is None:
            return
        m.e2e.labels(name).observe(self.last - self.arrival)
        m.request_prompt_tokens.labels(name).observe(self.num_prompt)
        m.request_generation_tokens.labels(name).observe(self.num_generated)
        if self.num_generated > 1:
            m.tpot.labels(name).observe((self.last - self.first) / (self.num_generated - 1))
