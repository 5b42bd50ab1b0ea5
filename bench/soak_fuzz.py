"""Fuzz: schemathesis (v4) against the live /openapi.json of the real server, >= 1,000 generated cases.

    python bench/soak_fuzz.py [--max-examples 100] [--seed 1] [--model DIR]

Starts `python -m service` (a tiny random checkpoint written by transformers unless --model is given) on a
loopback port with an API key, and runs `st run` with the examples, coverage and fuzzing phases over every
operation, positive and negative data, and these checks: no 5xx, status codes / content types / headers /
bodies as documented (SSE events included), schema-invalid data refused, auth not ignored, unsupported methods
refused, and tests/soak/sse_check.py's stream contract ([DONE] once and last, one finish_reason per choice).
Streams are read to their end. Prints a table and writes JSON to bench/results/soak_fuzz.json (or --out); the
schemathesis report and the server log go next to it. Exit status 1 if schemathesis failed or fewer than
--min-cases cases ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service_fixtures import ServerProcess, make_tiny_checkpoint  # noqa: E402
from tests.soak.load import metric_values  # noqa: E402
from tests.soak.servers import SERVER_ENV  # noqa: E402

KEY = "soak-fuzz-key"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,ignored_auth,unsupported_method,sse_contract")
CONFIG = 'hooks = "tests.soak.sse_check"\nmax-stream-events = 100000\n'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", type=Path, help="checkpoint (default: a tiny random one)")
    ap.add_argument("--min-cases", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=3000.0, help="seconds for the whole schemathesis run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak_fuzz.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="glm-serve-fuzz-"))
    model = args.model or make_tiny_checkpoint(tmp / "tiny-glm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = args.out.with_suffix(".st-report.json")
    server_log = args.out.with_suffix(".server.log")
    (tmp / "schemathesis.toml").write_text(CONFIG)
    server_args = ["--model", str(model), "--device", "cpu", "--max-model-len", "256", "--kv-cache-tokens", "8192",
                   "--max-num-seqs", "16", "--api-key", KEY]
    with ServerProcess(server_args, server_log, env=SERVER_ENV) as server:
        cmd = [str(Path(sys.executable).parent / "st"), "--config-file", str(tmp / "schemathesis.toml"), "--no-color",
               "run", server.base_url + "/openapi.json", "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "120", "--continue-on-failure",
               "-H", f"Authorization: Bearer {KEY}", "--report", "json", "--report-json-path", str(report)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "SCHEMATHESIS_HOOKS": "tests.soak.sse_check"}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
        elapsed = time.monotonic() - t0
        metrics = metric_values(server.base_url)
        health = __import__("httpx").get(server.base_url + "/health").status_code

    out = proc.stdout + proc.stderr
    generated = _int(r"(\d+) generated", out)
    by_status: dict[str, int] = {}
    for k, v in metrics.items():  # keys like glm_serve:http_requests_total{method=POST,route=/x,status=400}
        if k.startswith("glm_serve:http_requests_total{") and "status=" in k:
            code = k.split("status=")[1].split(",")[0].rstrip("}")
            by_status[code] = by_status.get(code, 0) + int(v)
    five_xx = {k: v for k, v in by_status.items() if k.startswith("5")}
    result = {
        "what": "schemathesis v4 against the live /openapi.json of the real server (tiny checkpoint, CPU)",
        "command": "python " + " ".join(sys.argv),
        "schemathesis_command": " ".join(cmd[1:]),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "schemathesis_version": _version(),
        "cases_generated": generated,
        "schemathesis_exit": proc.returncode,
        "duration_s": round(elapsed, 1),
        "server_requests": sum(by_status.values()),
        "server_responses_by_status": dict(sorted(by_status.items())),
        "server_5xx": five_xx,
        "health_after": health,
        "failures_summary": _failures(out),
        "checks": {"schemathesis passed": proc.returncode == 0,
                   f">= {args.min_cases} cases": generated >= args.min_cases, "no 5xx": not five_xx,
                   "healthy afterwards": health == 200},
        "report": str(report), "server_log": str(server_log),
        "stdout_tail": out[-6000:],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [("cases generated", generated), ("requests the server answered", result["server_requests"]),
            ("duration (s)", result["duration_s"]),
            ("server responses by status", result["server_responses_by_status"]),
            ("schemathesis exit", proc.returncode)] + [(f"check: {k}", "PASS" if v else "FAIL")
                                                       for k, v in result["checks"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if result["failures_summary"]:
        print("\n".join(result["failures_summary"]))
    print(f"\nwrote {args.out}")
    return 0 if all(result["checks"].values()) else 1


def _int(pattern: str, text: str) -> int:
    m = re.findall(pattern, text)
    return int(m[-1]) if m else 0


def _failures(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if re.match(r"\s*(-|❌) ?(ST\d+|.*failed)", line)][:40]


def _version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


if __name__ == "__main__":
    raise SystemExit(main())
