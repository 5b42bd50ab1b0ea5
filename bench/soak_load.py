"""Soak: N concurrent streaming clients (default 256) against the real server for a bounded time, a quarter of
them hanging up at random points, mixed parameters; then the server must be idle with an empty cache.

    python bench/soak_load.py [--clients 256] [--duration 60] [--hang-up 0.25] [--model DIR] [--kv-cache-tokens N]

Starts `python -m service` on a free loopback port (a tiny random checkpoint written by transformers unless
--model is given), warms it up, samples its RSS while the load runs, and checks: no 5xx; every stream that was
not hung up is valid SSE ending in `data: [DONE]` with one finish_reason per choice and no error event; after the
run num_requests_running = num_requests_waiting = 0 and kv_cache_usage_perc = 0. Prints a table and writes
JSON to bench/results/soak_load.json (or --out). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service_fixtures import ServerProcess, make_tiny_checkpoint  # noqa: E402
from tests.soak.load import metric_values, rss_bytes, run_load, wait_idle  # noqa: E402
from tests.soak.servers import SERVER_ENV  # noqa: E402

MiB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (after a warm-up)")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--hang-up", type=float, default=0.25, help="share of requests that hang up")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", type=Path, help="checkpoint (default: a tiny random one)")
    ap.add_argument("--kv-cache-tokens", type=int, default=65536)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak_load.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="glm-serve-soak-"))
    model = args.model or make_tiny_checkpoint(tmp / "tiny-glm")
    server_args = ["--model", str(model), "--device", "cpu", "--max-model-len", "512", "--kv-cache-tokens",
                   str(args.kv_cache_tokens), "--max-num-seqs", str(args.max_num_seqs),
                   "--max-queue-size", str(max(256, args.clients)), "--log-level", "warning"]
    with ServerProcess(server_args, tmp / "server.log", env=SERVER_ENV) as server:
        pid, url = server.proc.pid, server.base_url
        rss_start = rss_bytes(pid)
        warm = asyncio.run(run_load(url, args.clients, args.warmup, args.hang_up, args.max_tokens, args.seed + 1))
        wait_idle(url, timeout=120)
        rss_warm = rss_bytes(pid)
        before = metric_values(url)

        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(2.0):
                samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        report = asyncio.run(run_load(url, args.clients, args.duration, args.hang_up, args.max_tokens, args.seed))
        stop.set()
        after = wait_idle(url, timeout=120)
        rss_end = rss_bytes(pid)
        log_tail = server.log()[-2000:]

    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    gauges = {g: after.get("glm_serve:" + g) for g in ("num_requests_running", "num_requests_waiting",
                                                       "kv_cache_usage_perc")}
    five_xx = {k: v for k, v in delta.items() if k.startswith("glm_serve:http_requests_total{") and "status=5" in k
               and v}
    checks = {
        "no failed streams": not report.failures and not warm.failures,
        "no 5xx": not five_xx and all(s in (200, None) for s in report.statuses()),
        "idle afterwards (running = waiting = 0)": gauges["num_requests_running"] == 0
        and gauges["num_requests_waiting"] == 0,
        "cache empty afterwards": gauges["kv_cache_usage_perc"] == 0,
        "no engine errors": delta.get("glm_serve:request_success_total{finished_reason=error}", 0) == 0,
    }
    summary = report.summary()
    result = {
        "what": "soak: concurrent streaming clients with hang-ups against the real server (tiny checkpoint, CPU)",
        "command": "python " + " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
        "settings": vars(args) | {"model": str(model), "out": str(args.out)},
        "load": summary,
        "requests_per_s": round(summary["requests"] / summary["duration_s"], 1),
        "server_metrics_delta": {k.removeprefix("glm_serve:"): v for k, v in delta.items()
                                 if any(s in k for s in ("request_success_total{", "num_preemptions_total",
                                                         "generation_tokens_total", "admission_rejections_total{"))},
        "gauges_after": gauges,
        "rss_mib": {"start": round(rss_start / MiB, 1), "after_warmup": round(rss_warm / MiB, 1),
                    "end": round(rss_end / MiB, 1), "growth_after_warmup": round((rss_end - rss_warm) / MiB, 1),
                    "max_during": round(max((r for _, r in samples), default=rss_end) / MiB, 1),
                    "samples": [(t, round(r / MiB, 1)) for t, r in samples]},
        "checks": checks,
        "first_failures": [{"path": o.path, "request": o.request, "status": o.status, "problems": o.problems}
                           for o in (warm.failures + report.failures)[:10]],
        "five_xx": five_xx,
    }
    if not all(checks.values()):
        result["server_log_tail"] = log_tail
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _print_table(result)
    print(f"\nwrote {args.out}")
    return 0 if all(checks.values()) else 1


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _print_table(r: dict) -> None:
    load, rss = r["load"], r["rss_mib"]
    rows = [
        ("clients", load["clients"]), ("duration (s)", load["duration_s"]), ("requests", load["requests"]),
        ("requests/s", r["requests_per_s"]), ("completed streams (checked)", load["completed_streams"]),
        ("hung up", f"{load['hung_up']} {load['hang_up_points']}"), ("HTTP statuses", load["statuses"]),
        ("finish reasons (completed)", load["finish_reasons"]), ("SSE events read", load["events"]),
        ("preemptions", r["server_metrics_delta"].get("num_preemptions_total", 0)),
        ("server-side aborts", r["server_metrics_delta"].get("request_success_total{finished_reason=abort}", 0)),
        ("gauges after", r["gauges_after"]),
        ("RSS MiB start / warm / end / max", f"{rss['start']} / {rss['after_warmup']} / {rss['end']} / "
                                            f"{rss['max_during']}"),
        ("RSS growth after warm-up (MiB)", rss["growth_after_warmup"]),
    ]
    rows += [(f"check: {k}", "PASS" if v else "FAIL") for k, v in r["checks"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for f in r["first_failures"]:
        print("FAILED:", json.dumps(f, ensure_ascii=False)[:400])


if __name__ == "__main__":
    raise SystemExit(main())
