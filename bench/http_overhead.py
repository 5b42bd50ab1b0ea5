"""The same greedy work four ways: engine in-process, glm-serve over HTTP+SSE, transformers one at a time, and
transformers on padded static batches.

    python bench/http_overhead.py [--model DIR] [--concurrency 1 4 16] [--prompt-tokens 128] [--max-tokens 64]
                                  [--waves 2] [--repeats 3] [--threads 2] [--no-hf]

For each concurrency C, N = waves * C prompts of `prompt-tokens` random token ids, `max-tokens` new tokens each
(ignore_eos, temperature 0):
  - engine: LLMEngine in this process, a closed loop of C requests (the next one joins when one finishes);
  - server: `python -m service` in its own process, the in-repo SSE client (bench/loadgen.py) sending the very
    same token-id prompts C at a time to /v1/completions with stream=true;
  - hf-seq: transformers `generate()` one prompt at a time (measured once; it does not depend on C);
  - hf-batch: transformers `generate()` on left-padded static batches of C.
Engine and server alternate `repeats` times (medians). HTTP+SSE overhead = 1 - server tok/s / engine tok/s.
Targets (C = 16): server >= 10x hf-seq, >= 1.5x hf-batch, overhead <= 10%. Also the server's peak RSS.
Writes bench/results/http_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import checkpoints
import loadgen
import servers
from common import DEFAULT_THREADS, RESULTS, meta, pin_threads, print_table, ratio, warn_if_busy, write_result
from engine_runs import closed_loop, random_prompts

COLUMNS = [("concurrency", "C", "d"), ("engine_tok_s", "engine", ".1f"), ("server_tok_s", "server", ".1f"),
           ("http_overhead", "HTTP ovh", ".1%"), ("hf_seq_tok_s", "hf-seq", ".1f"),
           ("hf_batch_tok_s", "hf-batch", ".1f"),
           ("server_vs_hf_seq", "srv/seq", ".2fx"), ("server_vs_hf_batch", "srv/batch", ".2fx"),
           ("server_ttft_ms_p50", "TTFT p50", ".0f"), ("server_tpot_ms_p50", "TPOT p50", ".1f")]


def hf_runs(model_dir: Path, prompts: list[list[int]], max_tokens: int, concurrencies: list[int], seq_prompts: int
            ) -> tuple[float | None, dict[int, float]]:
    """(hf-seq tok/s, {C: hf-batch tok/s})."""
    import torch
    from engine_throughput import hf_generate
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hf_generate(hf, prompts[:1], 4, "cpu")  # warm-up
    t = time.perf_counter()
    for p in prompts[:seq_prompts]:
        hf_generate(hf, [p], max_tokens, "cpu")
    seq = seq_prompts * max_tokens / (time.perf_counter() - t)
    batch = {}
    for C in concurrencies:
        n = len(prompts) // C * C
        t = time.perf_counter()
        for i in range(0, n, C):
            hf_generate(hf, prompts[i:i + C], max_tokens, "cpu")
        batch[C] = n * max_tokens / (time.perf_counter() - t)
    del hf
    return seq, batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--waves", type=int, default=2, help="requests per concurrency slot")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--hf-seq-prompts", type=int, default=4, help="prompts timed for transformers one at a time")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--name", default="http_overhead")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warn_if_busy()
    threads = pin_threads(args.threads)
    model = checkpoints.model_or_shipped(args.model)

    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    max_len = args.prompt_tokens + args.max_tokens
    cache_tokens = args.max_num_seqs * (max_len + 16)
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=args.max_num_seqs,
                                                max_model_len=max_len + 16, kv_cache_tokens=cache_tokens))
    vocab = engine.model_config.vocab_size
    server_args = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(max_len + 16),
                   "--kv-cache-tokens", str(cache_tokens), "--device", "cpu"]
    srv = servers.start_glm_serve(model, threads, args.out_dir / "logs" / "http_overhead-server.log",
                                  extra_args=server_args)
    rows = []
    all_prompts = {C: random_prompts(args.waves * C, args.prompt_tokens, vocab, seed=C) for C in args.concurrency}
    with servers.running(srv):
        warm = random_prompts(8, args.prompt_tokens, vocab, seed=99)
        closed_loop(engine, warm, 8, 8, prefix="w")
        asyncio.run(loadgen.run_load(srv.url, srv.model, warm, 8, 8))
        for C in args.concurrency:
            prompts = all_prompts[C]
            eng, srv_runs = [], []
            for rep in range(args.repeats):
                run = closed_loop(engine, prompts, args.max_tokens, C, prefix=f"c{C}r{rep}-")
                eng.append(run.output_tokens / run.seconds)
                srv_runs.append(asyncio.run(loadgen.run_load(srv.url, srv.model, prompts, args.max_tokens, C)))
            row = {"concurrency": C, "requests": len(prompts), "engine_tok_s": statistics.median(eng),
                   "server_tok_s": statistics.median(r["output_tok_s"] for r in srv_runs),
                   "server_failed": sum(r["failed"] for r in srv_runs),
                   "server_ttft_ms_p50": statistics.median(r["ttft_ms_p50"] for r in srv_runs),
                   "server_tpot_ms_p50": statistics.median(r["tpot_ms_p50"] for r in srv_runs),
                   "engine_runs": eng, "server_runs": srv_runs}
            row["http_overhead"] = 1 - row["server_tok_s"] / row["engine_tok_s"]
            rows.append(row)
            print(f"  C={C}: engine {row['engine_tok_s']:.1f} tok/s, server {row['server_tok_s']:.1f} tok/s",
                  flush=True)
        rss = srv.peak_rss_mib()
    del engine
    hf_seq, hf_batch = None, {}
    if not args.no_hf:
        longest = max(args.concurrency)
        hf_seq, hf_batch = hf_runs(model, all_prompts[longest], args.max_tokens, args.concurrency,
                                   min(args.hf_seq_prompts, len(all_prompts[longest])))
    for row in rows:
        row["hf_seq_tok_s"] = hf_seq
        row["hf_batch_tok_s"] = hf_batch.get(row["concurrency"])
        row["server_vs_hf_seq"] = ratio(row["server_tok_s"], hf_seq)
        row["server_vs_hf_batch"] = ratio(row["server_tok_s"], row["hf_batch_tok_s"])
    m = meta(threads, model=str(model), prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
             waves=args.waves, repeats=args.repeats, **rss)
    print_table(f"HTTP+SSE vs engine vs transformers: output tok/s, {threads} threads, {args.prompt_tokens}-token "
                f"prompts, {args.max_tokens} new tokens, medians of {args.repeats}; server peak RSS "
                f"{rss['peak_rss_mib']:.0f} MiB, {rss.get('peak_rss_tree_mib') or 0:.0f} MiB with its engine process",
                COLUMNS, rows)
    print(f"wrote {write_result(args.name, rows, m, {'server': rss}, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
