"""MTP speculative decoding: output tokens/s and acceptance per draft position for K = 0..4.

    python bench/mtp.py [--model DIR] [--k 0 1 2 3 4] [--batch 1 4] [--prompts 8] [--prompt-tokens 64]
                        [--max-tokens 128] [--repeats 5] [--threads 2]

The shipped (trained) model by default: a random MTP layer would accept nothing. Prompts are real text from
the held-out split (runs/data/heldout.jsonl, else a few built-in lines), greedy, ignore_eos, so every run makes
the same number of tokens. For each batch size B, one engine per K (`num_speculative_tokens=K`) runs the
prompts as a closed loop of B requests, `repeats` times with the Ks interleaved in each repeat (so drift hits
them alike; median tokens/s); acceptance comes from EngineStats
(`spec_num_drafts`, `spec_num_draft_tokens`, `spec_num_accepted_tokens`, `spec_accepted_per_pos`): acceptance at
position i = accepted at i / drafts, mean accepted length = accepted / drafts. `same` counts prompts whose
tokens equal K = 0's (greedy speculation must be exact). Target: best K >= 1.7x K = 0 at batch 1.
Writes bench/results/mtp.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import checkpoints
from common import DEFAULT_THREADS, RESULTS, meta, pin_threads, print_table, warn_if_busy, write_result
from engine_runs import closed_loop, random_prompts, text_prompts

COLUMNS = [("batch", "B", "d"), ("k", "K", "d"), ("tok_s", "tok/s", ".1f"), ("speedup", "vs K=0", ".2fx"),
           ("mean_accepted", "acc/draft", ".2f"), ("accept_rate", "acc rate", ".1%"), ("accept_pos", "acc by pos", ""),
           ("same", "same", ""), ("error", "error", "")]


def stats_tuple(engine) -> tuple[int, int, int, list[int]]:
    s = engine.stats()
    return (getattr(s, "spec_num_drafts", 0), getattr(s, "spec_num_draft_tokens", 0),
            getattr(s, "spec_num_accepted_tokens", 0), list(getattr(s, "spec_accepted_per_pos", []) or []))


def make_engine(model: Path, k: int, batch: int, prompts: list[list[int]], max_tokens: int):
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    max_len = max(len(p) for p in prompts) + max_tokens + k + 8
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=max(batch, 1),
                                                max_model_len=max_len, kv_cache_tokens=batch * (max_len + 32),
                                                num_speculative_tokens=k))
    if k and getattr(engine, "num_speculative_tokens", k) != k:
        raise RuntimeError(f"engine runs K={getattr(engine, 'num_speculative_tokens', None)}, not {k}")
    closed_loop(engine, prompts[:batch], 8, batch, prefix="warm")
    return engine


def finish_row(engine, k: int, batch: int, speeds: list[float], tokens, before) -> dict:
    after = stats_tuple(engine)
    drafts, draft_tokens, accepted = (a - b for a, b in zip(after[:3], before[:3], strict=True))
    per_pos = [a - (before[3][i] if i < len(before[3]) else 0) for i, a in enumerate(after[3])]
    row = {"batch": batch, "k": k, "tok_s": statistics.median(speeds), "tok_s_runs": speeds, "drafts": drafts,
           "draft_tokens": draft_tokens, "accepted": accepted, "tokens": tokens,
           "preemptions": engine.stats().num_preemptions}
    if k and drafts:
        row["mean_accepted"] = accepted / drafts
        row["accept_rate"] = accepted / draft_tokens if draft_tokens else None
        row["accept_by_pos"] = [n / drafts for n in per_pos]
        row["accept_pos"] = " ".join(f"{x:.2f}" for x in row["accept_by_pos"])
    return row


def run_batch(model: Path, ks: list[int], batch: int, prompts: list[list[int]], max_tokens: int, repeats: int
              ) -> list[dict]:
    """One engine per K, all loaded at once; the repeats interleave the Ks, so drift hits them alike."""
    engines, errors = {}, {}
    for k in ks:
        try:
            engines[k] = make_engine(model, k, batch, prompts, max_tokens)
        except Exception as e:  # speculative decoding missing or broken: record it, keep the table
            errors[k] = f"{type(e).__name__}: {e}"[:120]
    before = {k: stats_tuple(e) for k, e in engines.items()}
    speeds: dict[int, list[float]] = {k: [] for k in engines}
    tokens: dict[int, list] = {}
    for rep in range(repeats):
        for k, engine in list(engines.items()):
            try:
                run = closed_loop(engine, prompts, max_tokens, batch, prefix=f"r{rep}-")
            except Exception as e:
                errors[k] = f"{type(e).__name__}: {e}"[:120]
                del engines[k]
                continue
            speeds[k].append(run.output_tokens / run.seconds)
            tokens.setdefault(k, run.tokens)
    rows = []
    for k in ks:
        if k in errors:
            rows.append({"batch": batch, "k": k, "error": errors[k]})
            print(f"B={batch} K={k}: {errors[k]}", file=sys.stderr)
        else:
            rows.append(finish_row(engines[k], k, batch, speeds[k], tokens[k], before[k]))
            print(f"  B={batch} K={k}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint with an MTP layer (default: the shipped model)")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--random-prompts", action="store_true", help="random token ids instead of held-out text")
    ap.add_argument("--name", default="mtp")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warn_if_busy()
    threads = pin_threads(args.threads)
    model = args.model or checkpoints.default_model()
    if model is None:
        raise SystemExit("no shipped model yet (model/weights/*/model.safetensors); pass --model DIR")
    if args.random_prompts or not (model / "tokenizer.json").is_file():
        from model.config import ModelConfig

        vocab = ModelConfig.from_dir(model).vocab_size
        prompts = random_prompts(args.prompts, args.prompt_tokens, vocab, low=min(16, vocab - 1))
    else:
        prompts = text_prompts(model, args.prompts, args.prompt_tokens)

    rows = []
    for batch in args.batch:
        batch_rows = run_batch(model, sorted(args.k), batch, prompts, args.max_tokens, args.repeats)
        base = next((r for r in batch_rows if r["k"] == 0 and "error" not in r), None)
        for row in batch_rows:
            if base is not None and "error" not in row:
                row["speedup"] = row["tok_s"] / base["tok_s"]
                same = sum(a == b for a, b in zip(row["tokens"], base["tokens"], strict=True))
                row["same"] = f"{same}/{len(prompts)}"
        rows += batch_rows
    for r in rows:
        r.pop("tokens", None)
    b1 = [r for r in rows if r.get("batch") == 1 and r.get("k", 0) > 0 and "speedup" in r]
    best = max(b1, key=lambda r: r["speedup"], default=None)
    summary = {"best_k_batch1": best and best["k"], "best_speedup_batch1": best and best["speedup"],
               "best_same_batch1": best and best.get("same")}
    m = meta(threads, model=str(model), prompts=args.prompts, prompt_tokens=args.prompt_tokens,
             max_tokens=args.max_tokens, repeats=args.repeats)
    print_table(f"MTP speculative decoding: greedy, {args.prompts} prompts x {args.max_tokens} tokens, {threads} "
                f"threads, medians of {args.repeats}", COLUMNS, rows)
    print(f"wrote {write_result(args.name, rows, m, summary, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
