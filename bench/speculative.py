"""Speculative decoding with the MTP layer: tokens/s and acceptance for K = 0..4, batch 1 and 8, code and prose;
and with `--ab`, adaptive MTP (`--num-speculative-tokens 3`, depth 0..3 per step) against `--num-speculative-tokens 0`.

    python bench/speculative.py [--model DIR] [--k 0 1 2 3 4] [--batch 1 8] [--prompt-set code prose]
                                [--prompts 8] [--prompt-tokens 64] [--max-tokens 128] [--repeats 5] [--threads 2]
    python bench/speculative.py --ab [--batch 1 8 32] ...        # writes bench/results/speculative_ab.json

The shipped (trained) model by default: a random MTP layer would accept nothing. Two prompt sets, each of
`--prompts` windows of `--prompt-tokens` tokens (engine_runs.prompt_set, seeded): "code" = held-out Python files
(runs/data/heldout.jsonl, kind "code"; else a few built-in lines), "prose" = English prose (the docstring and
comment paragraphs of those files; else built-in paragraphs), tokenized with the model dir's tokenizer. Greedy,
ignore_eos, so every run makes the same number of tokens.

For each batch size B, one engine per K (`num_speculative_tokens=K`) runs each prompt set as a closed loop of B
requests, `repeats` times with the Ks in turn in each repeat, in reverse order every other repeat (so drift hits
them alike); tok/s is the median. Per row (prompt set, B, K): speedup = the median over repeats of the ratio of
its tok/s to K = 0's in the same repeat (`speedup_runs`: each repeat's; this VM's speed wanders by +-25% within
a minute, so only runs seconds apart are compared); from EngineStats
(`spec_num_drafts`, `spec_num_draft_tokens`, `spec_num_accepted_tokens`, `spec_accepted_per_pos`) over that row's
runs: acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted / drafts, i.e. tokens
emitted per verify step (the bonus token plus the accepted drafts; K + 1 at most); acceptance at position i =
drafts whose i-th token was accepted / drafts. `same` counts prompts whose tokens equal K = 0's (greedy
speculation must be exact). Summary: the best K at batch 1 per prompt set, its speedup. Target (issue 4): best
K >= 1.7x K = 0 at batch 1, outputs identical. Writes bench/results/speculative.json. The K sweep runs each K
fixed (`speculative_policy="fixed"`).

`--ab` (issue 18): per prompt set and batch size B (default 1, 8, 32), two engines, adaptive MTP (K = 2,
`speculative_policy="adaptive"`) and K = 0, each runs a closed loop of B requests over max(prompts, waves x B)
prompts (`--waves`, default 4: the tail, where requests that drafted finish at different steps and the batch thins
out, must stay a small part of the run; K = 0's requests end together), every request `--max-tokens` long, or with
`--vary-lengths` each its own length (`varied_lengths`, as served traffic has: with one length, K = 0 prefills each
wave in one step while drafting spreads the prefills over nearly every step, a cost only the MTP run pays), repeats
in turn as above, median tok/s; per row the median of the per-repeat ratios to K = 0, identical tokens, the share
of steps that drafted each depth 0..K (what the adaptive policy chose) and the acceptance. Targets: >= 1.25x at
batch 1, >= 0.98x at 8 and at 32, greedy tokens identical. The adaptive engine records every step
(`SpecDecode.trace`): its row also has the median milliseconds of its steady steps (depth verified = depth drafted,
decode only) per depth over the whole run, the policy's own per-depth times (its recent medians) at the end, the
steps it never times (prefills, depth switches: count and median) and K = 0's mean milliseconds per step (prefills
included), to tell a wrong choice from a wrong measurement.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import checkpoints
from common import DEFAULT_THREADS, RESULTS, meta, pin_threads, print_table, warn_if_busy, write_result
from engine_runs import PROMPT_SETS, closed_loop, prompt_set, random_prompts

COLUMNS = [("prompt_set", "prompts", ""), ("batch", "B", "d"), ("k", "K", "d"), ("tok_s", "tok/s", ".1f"),
           ("speedup", "vs K=0", ".2fx"), ("accept_rate", "acc rate", ".1%"),
           ("mean_accept_len", "acc len (tok/step)", ".2f"), ("accept_pos", "acc by pos", ""), ("same", "same", ""),
           ("error", "error", "")]


def stats_tuple(engine) -> tuple[int, int, int, list[int]]:
    s = engine.stats()
    return (getattr(s, "spec_num_drafts", 0), getattr(s, "spec_num_draft_tokens", 0),
            getattr(s, "spec_num_accepted_tokens", 0), list(getattr(s, "spec_accepted_per_pos", []) or []))


def make_engine(model: Path, k: int | None, batch: int, prompts: list[list[int]], max_tokens: int | list[int],
                policy: str | None = "fixed"):
    """An engine drafting K tokens under `policy`; None for either: EngineConfig's default."""
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    spec = {"num_speculative_tokens": k, "speculative_policy": policy}
    spec = {name: v for name, v in spec.items() if v is not None}
    k = spec.get("num_speculative_tokens", EngineConfig.num_speculative_tokens)
    longest = max(max_tokens) if isinstance(max_tokens, list) else max_tokens
    max_len = max(len(p) for p in prompts) + longest + k + 8
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=max(batch, 1),
                                                max_model_len=max_len, kv_cache_tokens=batch * (max_len + 32),
                                                **spec))
    if k and getattr(engine, "num_speculative_tokens", k) != k:
        raise RuntimeError(f"engine runs K={getattr(engine, 'num_speculative_tokens', None)}, not {k}")
    closed_loop(engine, prompts[:batch], 8, batch, prefix="warm")
    return engine


def finish_row(engine, name: str, k: int, batch: int, speeds: list[float], tokens, before) -> dict:
    after = stats_tuple(engine)
    drafts, draft_tokens, accepted = (a - b for a, b in zip(after[:3], before[:3], strict=True))
    per_pos = [a - (before[3][i] if i < len(before[3]) else 0) for i, a in enumerate(after[3])]
    row = {"prompt_set": name, "batch": batch, "k": k, "tok_s": statistics.median(speeds), "tok_s_runs": speeds,
           "drafts": drafts, "draft_tokens": draft_tokens, "accepted": accepted, "tokens": tokens,
           "preemptions": engine.stats().num_preemptions}
    if k and drafts:
        row["accept_rate"] = accepted / draft_tokens if draft_tokens else None
        row["mean_accept_len"] = 1 + accepted / drafts
        row["accept_by_pos"] = [n / drafts for n in per_pos]
        row["accept_pos"] = " ".join(f"{x:.2f}" for x in row["accept_by_pos"])
    return row


def varied_lengths(n: int, mean: int, seed: int = 0) -> list[int]:
    """Per-request max_tokens, uniform in [mean / 2, 3 mean / 2] (seeded). With one length for all, every request
    of a K = 0 run ends at the same step and the next wave's prompts are prefilled together in one step, while
    drafting staggers the ends, so nearly every step of an MTP run carries a prefill beside its decodes; served
    traffic staggers both."""
    rng = random.Random(seed)
    return [rng.randint(max(1, mean // 2), max(1, 3 * mean // 2)) for _ in range(n)]


def in_turn(engines: dict, rep: int) -> list:
    """The engines of one repeat: forward on even repeats, backward on odd (A B, B A, ...), so a drift of the
    machine's speed within a repeat favours none of them over the run."""
    items = list(engines.items())
    return items if rep % 2 == 0 else items[::-1]


def paired(speeds: list[float], base: list[float]) -> dict:
    """Speed-up as the median over repeats of each repeat's ratio (runs of one repeat are seconds apart, while
    this VM's speed wanders by +-25% over a minute: a ratio of medians taken minutes apart carries that), and
    the ratios themselves for the spread."""
    ratios = [a / b for a, b in zip(speeds, base, strict=False)]
    return {"speedup": statistics.median(ratios), "speedup_runs": [round(r, 3) for r in ratios]}


def run_batch(model: Path, ks: list[int], batch: int, sets: dict[str, list[list[int]]], max_tokens: int,
              repeats: int) -> list[dict]:
    """One engine per K, all loaded at once, for every prompt set; per set, the repeats interleave the Ks, so
    drift hits them alike."""
    all_prompts = [p for prompts in sets.values() for p in prompts]
    engines, errors = {}, {}
    for k in ks:
        try:
            engines[k] = make_engine(model, k, batch, all_prompts, max_tokens)
        except Exception as e:  # speculative decoding missing or broken: record it, keep the table
            errors[k] = f"{type(e).__name__}: {e}"[:120]
    rows = []
    for name, prompts in sets.items():
        before = {k: stats_tuple(e) for k, e in engines.items()}
        speeds: dict[int, list[float]] = {k: [] for k in engines}
        tokens: dict[int, list] = {}
        for rep in range(repeats):
            for k, engine in in_turn(engines, rep):
                try:
                    run = closed_loop(engine, prompts, max_tokens, batch, prefix=f"{name}-r{rep}-")
                except Exception as e:
                    errors[k] = f"{type(e).__name__}: {e}"[:120]
                    del engines[k]
                    continue
                speeds[k].append(run.output_tokens / run.seconds)
                tokens.setdefault(k, run.tokens)
        batch_rows = []
        for k in ks:
            if k in errors:
                batch_rows.append({"prompt_set": name, "batch": batch, "k": k, "error": errors[k]})
                print(f"{name} B={batch} K={k}: {errors[k]}", file=sys.stderr)
            else:
                batch_rows.append(finish_row(engines[k], name, k, batch, speeds[k], tokens[k], before[k]))
                print(f"  {name} B={batch} K={k}: {batch_rows[-1]['tok_s']:.1f} tok/s", flush=True)
        base = next((r for r in batch_rows if r["k"] == 0 and "error" not in r), None)
        for row in batch_rows:
            if base is not None and "error" not in row:
                row.update(paired(row["tok_s_runs"], base["tok_s_runs"]))
                same = sum(a == b for a, b in zip(row["tokens"], base["tokens"], strict=True))
                row["same"] = f"{same}/{len(prompts)}"
        rows += batch_rows
    return rows


def best_k(rows: list[dict], batch: int) -> dict[str, dict]:
    """Per prompt set: the K > 0 with the highest speedup at `batch` (k, speedup, tok/s, same, acceptance)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["prompt_set"] for r in rows):
        cands = [r for r in rows if r["prompt_set"] == name and r.get("batch") == batch and r.get("k", 0) > 0
                 and "speedup" in r]
        best = max(cands, key=lambda r: r["speedup"], default=None)
        if best is not None:
            out[name] = {key: best.get(key) for key in ("k", "speedup", "tok_s", "same", "accept_rate",
                                                         "mean_accept_len", "accept_pos")}
    return out


AB_COLUMNS = [("prompt_set", "prompts", ""), ("batch", "B", "d"), ("config", "config", ""), ("k", "K", "d"),
              ("tok_s", "tok/s", ".1f"), ("speedup", "vs K=0", ".2fx"), ("target", "target", ".2fx"),
              ("depths", "steps at depth 0..K", ""), ("accept_rate", "acc rate", ".1%"), ("same", "same", ""),
              ("steady_ms", "steady ms/step by depth", ""), ("policy_ms", "policy's ms", ""),
              ("k0_ms_per_step", "K=0 ms/step", ".1f"), ("error", "error", "")]
AB_K = 3  # --ab: adaptive depth up to 3 (`--num-speculative-tokens 3`, the default configuration)
AB_TARGETS = {1: 1.25}  # other batch sizes: 0.98 (never a loss)


def depth_steps(engine) -> list[int]:
    spec = getattr(engine, "spec", None)
    return list(spec.depth_steps) if spec is not None else []


def step_costs(engine, batch: int) -> dict:
    """From the adaptive engine's step trace: per depth, the median milliseconds of its steady decode-only steps
    (depth verified = depth drafted, the steps the policy times) and their count, beside the policy's own table
    for this batch's bucket at the end (`policy_ms`). Where the two disagree, the policy compared stale times."""
    trace, policy = engine.spec.trace, engine.spec.policy
    steady: dict[int, list[float]] = {}
    other: list[float] = []  # switches of depth and steps with a prefill: not timed by the policy, still paid
    for _, verified, drafted, seconds, decode_only in trace:
        if decode_only and verified == drafted:
            steady.setdefault(drafted, []).append(seconds)
        else:
            other.append(seconds)
    depths = range(engine.num_speculative_tokens + 1)
    ms = [1000 * statistics.median(steady[k]) if k in steady else None for k in depths]
    bucket = policy.bucket_of(batch) if hasattr(policy, "bucket_of") else None
    seen = [policy.seconds(bucket, k) for k in depths] if bucket is not None and bucket in policy.buckets else []
    return {"steady_ms": " ".join("-" if m is None else f"{m:.1f}" for m in ms),
            "steady_steps": [len(steady.get(k, [])) for k in depths],
            "policy_ms": " ".join("-" if t is None else f"{1000 * t:.1f}" for t in seen) or "-",
            "trace_steps": len(trace), "trace_s": sum(t[3] for t in trace),
            "other_steps": len(other), "other_ms": 1000 * statistics.median(other) if other else None}


def adaptive_name(k: int) -> str:
    return "adaptive" if k == AB_K else f"adaptive<={k}"


def run_ab(model: Path, batch: int, sets: dict[str, list[list[int]]], max_tokens: int, repeats: int,
           vary: bool = False, ks: tuple[int, ...] = (AB_K,)) -> list[dict]:
    """Adaptive MTP (K <= each of `ks`) against K = 0 at one batch size, per prompt set, taking turns; with
    `vary`, each prompt has its own max_tokens (`varied_lengths`), the same for every engine."""
    rows = []
    for name, prompts in sets.items():
        lengths = varied_lengths(len(prompts), max_tokens) if vary else max_tokens
        engines = {adaptive_name(k): make_engine(model, k, batch, prompts, lengths, policy="adaptive") for k in ks}
        engines["K=0"] = make_engine(model, 0, batch, prompts, lengths)
        for config, engine in engines.items():
            if config != "K=0":
                engine.spec.trace = []  # every step's (batch, depths, seconds): what the policy saw
        before = {c: (stats_tuple(e), depth_steps(e)) for c, e in engines.items()}
        k0_steps: list[float] = []
        speeds: dict[str, list[float]] = {c: [] for c in engines}
        tokens: dict[str, list] = {}
        for rep in range(repeats):
            for config, engine in in_turn(engines, rep):
                run = closed_loop(engine, prompts, lengths, batch, prefix=f"{name}-r{rep}-")
                speeds[config].append(run.output_tokens / run.seconds)
                tokens.setdefault(config, run.tokens)
                if config == "K=0":
                    k0_steps.append(run.seconds / run.steps)
        for config, engine in engines.items():
            row = finish_row(engine, name, engine.num_speculative_tokens, batch, speeds[config], None,
                             before[config][0])
            row.pop("tokens")
            steps = [a - b for a, b in zip(depth_steps(engine), before[config][1], strict=True)]
            row.update(paired(speeds[config], speeds["K=0"]))
            row.update(config=config, depth_steps=steps,
                       depths=" ".join(f"{n / max(1, sum(steps)):.2f}" for n in steps) if steps else "-",
                       same=f"{sum(a == b for a, b in zip(tokens[config], tokens['K=0'], strict=True))}/{len(prompts)}")
            if config != "K=0":
                row["target"] = AB_TARGETS.get(batch, 0.98)
                row.update(step_costs(engine, batch))
                row["k0_ms_per_step"] = 1000 * statistics.median(k0_steps)
            rows.append(row)
            print(f"  {name} B={batch} {config}: {row['tok_s']:.1f} tok/s ({row['speedup']:.2f}x)", flush=True)
    return rows


def main_ab(args: argparse.Namespace, model: Path, threads: int) -> int:
    batches = args.batch if args.batch != [1, 8] else [1, 8, 32]
    rows = []
    for batch in batches:
        n = max(args.prompts, args.waves * batch)
        sets = load_sets(args, model, n)
        rows += run_ab(model, batch, sets, args.max_tokens, args.repeats, args.vary_lengths, tuple(args.ab_k))
    misses = [r for r in rows if r["config"] != "K=0" and (r["speedup"] < r["target"]
                                                               or r["same"].split("/")[0] != r["same"].split("/")[1])]
    by_batch = {f"{r['prompt_set']} B={r['batch']}{r['config'].removeprefix('adaptive')}": round(r["speedup"], 3)
                for r in rows if r["config"] != "K=0"}
    summary = {"targets": {str(b): AB_TARGETS.get(b, 0.98) for b in batches}, "met": not misses, "by_batch": by_batch}
    m = meta(threads, model=str(model), prompt_sets=list(dict.fromkeys(r["prompt_set"] for r in rows)),
             prompts=args.prompts, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, repeats=args.repeats,
             vary_lengths=args.vary_lengths)
    per_request = (f"{args.max_tokens // 2}-{3 * args.max_tokens // 2} tokens per request (varied)" if args.vary_lengths
                   else f"{args.max_tokens} tokens per request")
    depths = " / ".join(map(str, args.ab_k))
    print_table(f"Adaptive MTP (K <= {depths}) vs --num-speculative-tokens 0: greedy, closed loop of B, "
                f"{per_request}, {threads} threads, medians of {args.repeats}; load "
                f"{os.getloadavg()[0]:.2f}", AB_COLUMNS, rows)
    print(f"targets (>= 1.25x at B=1, >= 0.98x elsewhere, tokens identical): {'met' if not misses else 'MISSED'}")
    name = args.name if args.name != "speculative" else "speculative_ab"
    print(f"wrote {write_result(name, rows, m, summary, args.out_dir)}", file=sys.stderr)
    return 0


def load_sets(args: argparse.Namespace, model: Path, n: int) -> dict[str, list[list[int]]]:
    if args.random_prompts or not (model / "tokenizer.json").is_file():
        from model.config import ModelConfig

        vocab = ModelConfig.from_dir(model).vocab_size
        return {"random": random_prompts(n, args.prompt_tokens, vocab, low=min(16, vocab - 1))}
    return {name: prompt_set(name, model, n, args.prompt_tokens) for name in dict.fromkeys(args.prompt_set)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint with an MTP layer (default: the shipped model)")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-set", nargs="+", choices=PROMPT_SETS, default=list(PROMPT_SETS))
    ap.add_argument("--prompts", type=int, default=8, help="prompts per set")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--random-prompts", action="store_true",
                    help="random token ids instead of text (one set, named 'random')")
    ap.add_argument("--ab", action="store_true", help="the default configuration vs K = 0 at --batch (default "
                    "1 8 32) instead of the K sweep")
    ap.add_argument("--ab-k", type=int, nargs="+", default=[AB_K], help="--ab: the adaptive engines' largest "
                    f"depths, each against K = 0 in the same run (default {AB_K}, the default configuration's)")
    ap.add_argument("--waves", type=int, default=4, help="--ab: prompts per closed loop = waves x batch (at least)")
    ap.add_argument("--vary-lengths", action="store_true", help="--ab: each request's max_tokens uniform in "
                    "[max-tokens / 2, 3 max-tokens / 2] (seeded, the same for both configurations)")
    ap.add_argument("--name", default="speculative")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warn_if_busy()
    threads = pin_threads(args.threads)
    model = checkpoints.model_or_shipped(args.model)
    if args.ab:
        return main_ab(args, model, threads)
    sets = load_sets(args, model, args.prompts)

    rows = []
    for batch in args.batch:
        rows += run_batch(model, sorted(set(args.k)), batch, sets, args.max_tokens, args.repeats)
    for r in rows:
        r.pop("tokens", None)
    summary = {"best_batch1": best_k(rows, 1), "best_by_batch": {str(b): best_k(rows, b) for b in args.batch},
               "target_speedup_batch1": 1.7}
    m = meta(threads, model=str(model), prompt_sets=list(sets), prompts=args.prompts,
             prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, repeats=args.repeats)
    print_table(f"MTP speculative decoding: greedy, {args.prompts} prompts per set x {args.max_tokens} tokens, "
                f"{threads} threads, medians of {args.repeats}; acc len = 1 + accepted/drafts (tokens per verify "
                f"step)", COLUMNS, rows)
    for name, b in summary["best_batch1"].items():
        print(f"best K at batch 1, {name}: K={b['k']}, {b['speedup']:.2f}x K=0 (target >= 1.7x), same {b['same']}")
    print(f"wrote {write_result(args.name, rows, m, summary, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
