"""Run aiperf (NVIDIA's load generator, in .venv-aiperf) against one server at one concurrency; parse its summary.

The workload: synthetic chat prompts of `isl` tokens (made with the checkpoint's own tokenizer, a local
directory: no hub access), `osl` output tokens forced with `ignore_eos`, streamed, token counts from the
server's usage chunk. aiperf's TPOT-style "inter token latency" is per request (e2e - TTFT) / (osl - 1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from common import ROOT

AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"


def available() -> bool:
    return AIPERF.exists() or shutil.which("aiperf") is not None


def command(url: str, model: str, tokenizer: Path, concurrency: int, requests: int, isl: int, osl: int,
            artifact_dir: Path, warmup: int = 0, seed: int = 0) -> list[str]:
    exe = str(AIPERF) if AIPERF.exists() else "aiperf"
    cmd = [exe, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
           "--tokenizer", str(tokenizer), "--isl", str(isl), "--osl", str(osl), "--extra-inputs", "ignore_eos:true",
           "--extra-inputs", "temperature:0", "--concurrency", str(concurrency), "--request-count", str(requests),
           "--random-seed", str(seed), "--ui-type", "none", "--artifact-dir", str(artifact_dir),
           "--use-server-token-count", "--no-server-metrics", "--no-gpu-telemetry", "--export-level", "summary"]
    if warmup:
        cmd += ["--warmup-request-count", str(warmup)]
    return cmd


def run(url: str, model: str, tokenizer: Path, concurrency: int, requests: int, isl: int, osl: int,
        artifact_dir: Path, warmup: int = 0, timeout: float = 1800) -> dict:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(url, model, tokenizer, concurrency, requests, isl, osl, artifact_dir, warmup)
    log = artifact_dir / "aiperf.out"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    summary = artifact_dir / "profile_export_aiperf.json"
    if proc.returncode != 0 or not summary.is_file():
        raise RuntimeError(f"aiperf failed ({proc.returncode}); see {log}")
    return parse(json.loads(summary.read_text()), concurrency)


def parse(d: dict, concurrency: int) -> dict:
    def stat(key: str, which: str) -> float | None:
        v = d.get(key)
        return v.get(which) if isinstance(v, dict) else None

    completed = stat("request_count", "avg")
    errors = d.get("error_summary") or []
    return {
        "concurrency": concurrency, "completed": completed, "failed": sum(e.get("count", 0) for e in errors
                                                                          if isinstance(e, dict)),
        "output_tok_s": stat("output_token_throughput", "avg"), "requests_s": stat("request_throughput", "avg"),
        "ttft_ms_p50": stat("time_to_first_token", "p50"), "ttft_ms_p99": stat("time_to_first_token", "p99"),
        "tpot_ms_p50": stat("inter_token_latency", "p50"), "tpot_ms_p99": stat("inter_token_latency", "p99"),
        "itl_ms_p50": stat("inter_chunk_latency", "p50"), "itl_ms_p99": stat("inter_chunk_latency", "p99"),
        "e2el_ms_p50": stat("request_latency", "p50"), "e2el_ms_p99": stat("request_latency", "p99"),
        "isl": stat("input_sequence_length", "avg"), "osl": stat("output_sequence_length", "avg"),
        "duration_s": stat("benchmark_duration", "avg"),
    }
