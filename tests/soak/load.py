"""Concurrent streaming clients with mixed parameters, some of which hang up at random points; every stream that
is read to the end is checked against the SSE contract (docs/ARCHITECTURE.md, "Streams").

Used by tests/test_reliability_load.py (a short run in the normal suite) and bench/soak_load.py (256 clients).
Closed loop: each client sends its next request as soon as the previous one ended, until the deadline.
A hang-up is one of: cancel the request within 50 ms of sending it (usually before the response headers), close
right after the headers, or close after a random number of events. A stream that ends before its hang-up point
counts as completed and is checked. Everything is seeded, so a failure names a request that can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serving", "tokens", "caches", "batches",
         "streams", "hello", "world", "numbers", "one", "two", "three", "café", "東京", "🙂", "def", "add(a,", "b):",
         "return", "a", "+", "b", "\n")
STOPS = ("\n", ".", " the", "o", "zz", "🙂")


@dataclass
class Outcome:
    request: dict[str, Any]
    path: str
    status: int | None = None
    hung_up: str | None = None  # None, "cancel_early", "after_headers" or "after_events"
    events: int = 0
    problems: list[str] = field(default_factory=list)
    finish_reasons: Counter = field(default_factory=Counter)


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    outcomes: list[Outcome]

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.hung_up is None]

    @property
    def hung_up(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.hung_up is not None]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problems]

    def statuses(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    def summary(self) -> dict[str, Any]:
        reasons: Counter = Counter()
        for o in self.completed:
            reasons.update(o.finish_reasons)
        return {"clients": self.clients, "duration_s": round(self.duration_s, 1), "requests": len(self.outcomes),
                "completed_streams": len(self.completed), "hung_up": len(self.hung_up),
                "hang_up_points": dict(Counter(o.hung_up for o in self.hung_up)),
                "statuses": {str(k): v for k, v in sorted(self.statuses().items(), key=lambda kv: str(kv[0]))},
                "finish_reasons": dict(reasons), "events": sum(o.events for o in self.outcomes),
                "failures": len(self.failures)}


def random_request(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any], int]:
    """(path, body, number of choices) with mixed sampling parameters."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    body: dict[str, Any] = {"max_tokens": rng.randint(1, max_tokens), "stream": True}
    n = rng.choice((1, 1, 1, 2, 3))
    if n > 1:
        body["n"] = n
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=rng.uniform(0.1, 1.5), top_p=rng.uniform(0.5, 1.0), top_k=rng.choice((0, 5, 50)),
                    seed=rng.randint(0, 1000))
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body.update(presence_penalty=rng.uniform(-1, 1), frequency_penalty=rng.uniform(-1, 1),
                    repetition_penalty=rng.uniform(0.8, 1.3))
    if rng.random() < 0.6:
        body["messages"] = [{"role": "user", "content": words}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "Be brief."})
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
        return "/v1/chat/completions", body, n
    prompts = 1
    if rng.random() < 0.2:
        prompts = 2
        body["prompt"] = [words, words[::-1] or "x"]
    else:
        body["prompt"] = words
    if rng.random() < 0.2:
        body["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.1:
        body["echo"] = True
    return "/v1/completions", body, n * prompts


def check_events(events: list[str], path: str, body: dict[str, Any], choices: int, out: Outcome) -> None:
    """The SSE contract for a stream read to the end."""
    if not events or events[-1] != "[DONE]":
        out.problems.append(f"stream does not end with [DONE]: {events[-1:]!r}")
    if events.count("[DONE]") != 1:
        out.problems.append(f"[DONE] {events.count('[DONE]')} times")
    chunks = []
    for e in events:
        if e == "[DONE]":
            continue
        try:
            chunks.append(json.loads(e))
        except ValueError:
            out.problems.append(f"event is not JSON: {e[:100]!r}")
    obj = "chat.completion.chunk" if path.endswith("chat/completions") else "text_completion"
    finishes: dict[int, list[str]] = {}
    usage_chunks = 0
    for c in chunks:
        if "error" in c:
            out.problems.append(f"error event: {c['error']}")
            continue
        if c.get("object") != obj:
            out.problems.append(f"object {c.get('object')!r}")
        if not c["choices"]:
            usage_chunks += 1
            continue
        for ch in c["choices"]:
            if ch.get("finish_reason") is not None:
                finishes.setdefault(ch["index"], []).append(ch["finish_reason"])
                out.finish_reasons[ch["finish_reason"]] += 1
    if sorted(finishes) != list(range(choices)) or any(len(v) != 1 for v in finishes.values()):
        out.problems.append(f"finish_reasons per choice {finishes}, expected one for each of {choices}")
    want_usage = bool(body.get("stream_options", {}).get("include_usage"))
    if usage_chunks != int(want_usage):
        out.problems.append(f"{usage_chunks} usage chunks, expected {int(want_usage)}")


async def one_request(client: httpx.AsyncClient, rng: random.Random, max_tokens: int, hangup_frac: float,
                      deadline: float) -> Outcome:
    path, body, choices = random_request(rng, max_tokens)
    out = Outcome(body, path)
    hangup = rng.random() < hangup_frac
    point = rng.choice(("cancel_early", "after_headers", "after_events", "after_events")) if hangup else None
    after = rng.randint(1, 8)
    timeout = max(5.0, deadline - time.monotonic() + 120.0)

    async def run() -> None:
        async with client.stream("POST", path, json=body, timeout=timeout) as r:
            out.status = r.status_code
            if point == "after_headers":
                out.hung_up = point
                return
            raw = b""
            async for piece in r.aiter_bytes():
                raw += piece
                out.events = raw.count(b"\n\n")
                if point == "after_events" and out.events >= after:
                    out.hung_up = point
                    return
            if r.status_code != 200:
                out.problems.append(f"HTTP {r.status_code}: {raw[:200]!r}")
                return
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                out.problems.append(f"content-type {r.headers.get('content-type')}")
            text = raw.decode("utf-8")
            if not text.endswith("\n\n"):
                out.problems.append(f"stream cut: ends {text[-80:]!r}")
                return
            events = text[:-2].split("\n\n")
            if not all(e.startswith("data: ") for e in events):
                out.problems.append("an event is not `data: ...`")
            check_events([e[6:] for e in events], path, body, choices, out)

    try:
        if point == "cancel_early":
            try:
                await asyncio.wait_for(run(), rng.uniform(0.0, 0.05))
            except TimeoutError:
                out.hung_up = point
        else:
            await run()
    except httpx.HTTPError as e:
        out.problems.append(f"{type(e).__name__}: {e}")
    return out


async def run_load(base_url: str, clients: int, duration_s: float, hangup_frac: float = 0.25, max_tokens: int = 48,
                   seed: int = 0, headers: dict[str, str] | None = None) -> LoadReport:
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    start = time.monotonic()
    deadline = start + duration_s
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 100_003 + i)
            while time.monotonic() < deadline:
                outcomes.append(await one_request(client, rng, max_tokens, hangup_frac, deadline))

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return LoadReport(clients, time.monotonic() - start, outcomes)


# -- the server's side ----------------------------------------------------------------------------------------------
def metric_values(base_url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics samples keyed `name{label=value,...}` (model_name left out), plus each name's total."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = httpx.get(base_url + "/metrics", headers=headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name") + "}")
            totals[key] = totals.get(key, 0.0) + s.value
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def wait_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once running = waiting = 0 and the cache is empty, or the last reading after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(base_url)
        idle = (m.get("glm_serve:num_requests_running") == 0 and m.get("glm_serve:num_requests_waiting") == 0
                and m.get("glm_serve:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
