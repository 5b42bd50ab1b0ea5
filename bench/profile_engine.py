"""Where the time goes: the profiles behind the optimisation notes (not a benchmark; prints shares, writes JSON).

    python bench/profile_engine.py engine [--concurrency 16] [--k 0]   # engine step phases + top torch ops
    python bench/profile_engine.py dsa [--context 16384]               # one decode step, sparse vs dense, by op
    python bench/profile_engine.py server [--concurrency 16]           # py-spy on a live server under load
    python bench/profile_engine.py steps [--batches 1 4 16 64]         # per-step CPU time vs batch size
    python bench/profile_engine.py steps --detokenize engine           # ...with text made in the step (before)
    python bench/profile_engine.py steps --baseline DIR [--repeats 3]  # the same, A/B against DIR's code

engine: LLMEngine in-process on the shipped model, a closed loop of C greedy requests; wall time of each engine
phase (schedule, prepare, forward, MTP propose, sample, postprocess) from wrappers around those methods, and the
top operators by self CPU time from torch.profiler. server: `python -m service` under the in-repo SSE client,
sampled by py-spy (from .venv-aiperf or PATH) for `--seconds`; shares of samples per thread and per function
(inclusive), which splits the event loop's HTTP/SSE work from the engine loop's. steps (issue 18): a random
GlmMoeDsa with hidden_size 64 (bench/checkpoints.py; `--model` for another), where a step is nearly all engine
work; at each batch size B a closed loop of B greedy requests, and per decode-only step (no prefill rode along)
the median wall time and each phase's share of it; the slope is what one more sequence adds to a step.
Writes profile_steps.json (a PNG plot too when matplotlib is installed). With `--baseline DIR` (a checkout of
other code, e.g. `git worktree add /tmp/base main`), each repeat runs DIR's and this tree's `steps` in fresh
processes, alternating, on the same checkpoint; per batch size the median over repeats of each, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import checkpoints
import loadgen
import servers
from common import DEFAULT_THREADS, RESULTS, ROOT, meta, pin_threads, print_table, write_result
from engine_runs import closed_loop, random_prompts

PHASES = [
    ("service.engine.scheduler", "Scheduler", "schedule"),
    ("service.engine.model_runner", "ModelRunner", "prepare"),
    ("service.engine.model_runner", "ModelRunner", "forward"),
    ("service.engine.model_runner", "ModelRunner", "sample"),
    ("service.engine.speculative", "MTPProposer", "propose"),
    ("service.engine.engine", "LLMEngine", "_postprocess"),
    ("service.engine.engine", "LLMEngine", "step"),
]


def wrap_phases() -> dict[str, float]:
    """Accumulate wall seconds per phase (outermost call only for re-entrant ones)."""
    import importlib

    acc: dict[str, float] = collections.defaultdict(float)
    for mod_name, cls_name, meth in PHASES:
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError):
            continue
        fn = getattr(cls, meth, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _key=f"{cls_name}.{meth}", **kw):
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                acc[_key] += time.perf_counter() - t

        setattr(cls, meth, functools.wraps(fn)(timed))
    return acc


def profile_engine(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acc = wrap_phases()
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    model = args.model or checkpoints.default_model()
    C, L, new = args.concurrency, args.prompt_tokens, args.max_tokens
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=C, max_model_len=L + new + 16,
                                                kv_cache_tokens=C * (L + new + 32), num_speculative_tokens=args.k,
                                                speculative_policy="fixed"))
    prompts = random_prompts(2 * C, L, engine.model_config.vocab_size, seed=C)
    closed_loop(engine, prompts[:C], 4, C, prefix="w")
    acc.clear()
    run = closed_loop(engine, prompts, new, C, prefix="a")
    phases = dict(acc)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        closed_loop(engine, prompts[:C], new // 4, C, prefix="p")
    total = phases.get("LLMEngine.step", run.seconds)
    rows = [{"phase": k, "seconds": v, "share": v / total} for k, v in sorted(phases.items(), key=lambda x: -x[1])]
    ops = prof.key_averages()
    op_total = sum(e.self_cpu_time_total for e in ops) or 1
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]
    op_rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000,
                "share": e.self_cpu_time_total / op_total} for e in top]
    print_table(f"engine phases: C={C}, K={args.k}, {run.output_tokens} tokens in {run.seconds:.2f}s "
                f"({run.output_tokens / run.seconds:.1f} tok/s), {run.steps} steps, "
                f"{1000 * run.seconds / max(run.steps, 1):.1f} ms/step",
                [("phase", "phase", ""), ("seconds", "s", ".3f"), ("share", "of step", ".1%")], rows)
    print_table("top torch ops by self CPU time (profiled run)", [("op", "op", ""), ("calls", "calls", "d"),
                ("self_ms", "self ms", ".1f"), ("share", "share", ".1%")], op_rows)
    torch.set_num_threads(torch.get_num_threads())
    return {"phases": rows, "ops": op_rows, "tok_s": run.output_tokens / run.seconds, "steps": run.steps,
            "ms_per_step": 1000 * run.seconds / max(run.steps, 1)}


def profile_dsa(args) -> dict:
    import torch
    from dsa import decode_step, prefill
    from torch.profiler import ProfilerActivity, profile

    from model.loader import load_model

    tmp = tempfile.TemporaryDirectory(prefix="prof-dsa-")
    L = args.context
    sparse_dir = checkpoints.glm_checkpoint(Path(tmp.name) / "s", tokenizer=False, max_position_embeddings=L + 64)
    dense_dir = checkpoints.dense_twin(sparse_dir, Path(tmp.name) / "d", index_topk=L + 64)
    out = {}
    for name, path in (("sparse", sparse_dir), ("dense", dense_dir)):
        model = load_model(path).eval()
        ids = torch.randint(16, model.config.vocab_size, (L + 1,), generator=torch.Generator().manual_seed(0))
        cache, _ = prefill(model, ids, L, 2048)
        for _ in range(3):
            decode_step(model, cache, ids, L)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                decode_step(model, cache, ids, L)
        ops = prof.key_averages()
        tot = sum(e.self_cpu_time_total for e in ops) or 1
        top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]
        rows = [{"op": e.key, "calls": e.count // 10, "ms_per_step": e.self_cpu_time_total / 10000,
                 "share": e.self_cpu_time_total / tot} for e in top]
        print_table(f"DSA profile, {name}, decode at context {L}: {tot / 10000:.1f} ms/step of op self time",
                    [("op", "op", ""), ("calls", "calls/step", "d"), ("ms_per_step", "ms/step", ".2f"),
                     ("share", "share", ".1%")], rows)
        out[name] = rows
    return out


def profile_steps(args) -> dict:
    """Median decode-step wall time and its phases at each batch size (see the module docstring)."""
    import statistics

    acc = wrap_phases()
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    tmp = tempfile.TemporaryDirectory(prefix="prof-steps-")
    # With the shipped tokenizer when there is one: detokenizing is part of a step's work.
    model = args.model or checkpoints.glm_checkpoint(Path(tmp.name) / "h64", hidden_size=64)
    L, new = args.prompt_tokens, args.max_tokens
    rows = []
    for B in args.batches:
        engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=B,
                                                    max_model_len=L + new + 16, kv_cache_tokens=B * (L + new + 32),
                                                    num_speculative_tokens=0,
                                                    detokenize=args.detokenize == "engine"))
        prompts = random_prompts(B, L, engine.model_config.vocab_size, seed=B)
        closed_loop(engine, prompts, 4, B, prefix="w")  # warm-up
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, _greedy(new))
        engine.step()  # the prefill
        steps: list[dict[str, float]] = []
        while engine.has_unfinished():
            acc.clear()
            engine.step()
            steps.append(dict(acc))
        steps = steps[:-1] or steps  # the last step also frees every sequence
        ms = {k: 1000 * statistics.median(s.get(k, 0.0) for s in steps) for k in steps[0]}
        row = {"batch": B, "steps": len(steps), "step_ms": ms.pop("LLMEngine.step", 0.0)}
        row.update({k.split(".")[-1] + "_ms": v for k, v in ms.items()})
        rows.append(row)
        print(f"  B={B}: {row['step_ms']:.2f} ms/step", flush=True)
    for prev, row in zip(rows, rows[1:], strict=False):
        row["ms_per_extra_seq"] = (row["step_ms"] - prev["step_ms"]) / (row["batch"] - prev["batch"])
    cols = [("batch", "B", "d"), ("step_ms", "ms/step", ".2f"), ("ms_per_extra_seq", "ms per extra seq", ".3f")]
    cols += [(k, k[:-3], ".2f") for k in rows[0] if k.endswith("_ms") and k != "step_ms"]
    print_table(f"per-step wall time of decode steps (median), {L}-token prompts, {new} new tokens, "
                f"{'hidden-64 random checkpoint' if args.model is None else args.model}, detokenized in the "
                f"{'engine' if args.detokenize == 'engine' else 'API process (not timed)'}", cols, rows)
    plot = plot_steps({"step": [(r["batch"], r["step_ms"]) for r in rows]}, args.out_dir / "profile_steps.png")
    print(f"plot: {plot}" if plot else "plot: skipped (matplotlib is not installed)", file=sys.stderr)
    return {"rows": rows, "plot": str(plot) if plot else None}


def compare_steps(args) -> dict:
    """A/B of `steps`: the baseline checkout's code and this tree's, alternating in fresh processes."""
    import json
    import os
    import statistics

    tmp = tempfile.TemporaryDirectory(prefix="prof-ab-")
    model = args.model or checkpoints.glm_checkpoint(Path(tmp.name) / "h64", hidden_size=64)
    trees = {"before": Path(args.baseline).resolve(), "after": ROOT}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.repeats):
        for name, tree in trees.items():
            out = Path(tmp.name) / f"{name}{r}"
            cmd = [sys.executable, str(tree / "bench" / "profile_engine.py"), "steps", "--model", str(model),
                   "--threads", str(args.threads), "--out-dir", str(out), "--prompt-tokens", str(args.prompt_tokens),
                   "--max-tokens", str(args.max_tokens), "--batches", *map(str, args.batches)]
            print(f"repeat {r + 1}/{args.repeats}: {name} ({tree})", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                           stdout=subprocess.DEVNULL)
            runs[name].append(json.loads((out / "profile_steps.json").read_text())["summary"])
    rows = []
    for i, B in enumerate(args.batches):
        row: dict = {"batch": B}
        for name in trees:
            for key in ("step_ms", "forward_ms"):
                row[f"{name}_{key}"] = statistics.median(run["rows"][i][key] for run in runs[name])
            row[f"{name}_rest_ms"] = row[f"{name}_step_ms"] - row[f"{name}_forward_ms"]
        rows.append(row)
    for prev, row in zip(rows, rows[1:], strict=False):
        for name in trees:
            for key in ("step", "rest"):
                row[f"{name}_{key}_per_seq"] = (row[f"{name}_{key}_ms"] - prev[f"{name}_{key}_ms"]) / (
                    row["batch"] - prev["batch"])
    cols = [("batch", "B", "d")] + [(f"{n}_{k}", f"{n} {label}", ".3f" if "per_seq" in k else ".2f")
                                    for k, label in (("step_ms", "ms/step"), ("step_per_seq", "ms/extra seq"),
                                                     ("rest_ms", "non-forward ms"),
                                                     ("rest_per_seq", "non-fwd ms/extra seq"))
                                    for n in trees]
    print_table(f"decode step wall time (median of {args.repeats} alternating runs), before = {trees['before']}",
                cols, rows)
    series = {n: [(r["batch"], r[f"{n}_step_ms"]) for r in rows] for n in trees}
    series |= {f"{n} (outside forward)": [(r["batch"], r[f"{n}_rest_ms"]) for r in rows] for n in trees}
    plot = plot_steps(series, args.out_dir / "profile_steps.png")
    return {"rows": rows, "runs": runs, "plot": str(plot) if plot else None}


def _greedy(max_tokens: int):
    from service.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def plot_steps(series: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        ax.plot([b for b, _ in points], [ms for _, ms in points], marker="o", label=label,
                linestyle="--" if "outside" in label else "-")
    if len(series) > 1:
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("running sequences (batch)")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title("engine step time vs batch size")
    ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def pyspy() -> str | None:
    exe = ROOT / ".venv-aiperf" / "bin" / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile_server(args) -> dict:
    exe = pyspy()
    if exe is None:
        raise SystemExit("py-spy missing: .venv-aiperf/bin/pip install py-spy")
    model = args.model or checkpoints.default_model()
    C, L, new = args.concurrency, args.prompt_tokens, args.max_tokens
    srv = servers.start_glm_serve(model, args.threads, RESULTS / "logs" / "profile-server.log",
                                  extra_args=["--max-num-seqs", str(C), "--kv-cache-tokens", str(C * (L + new + 32))])
    raw = Path(tempfile.mkdtemp(prefix="pyspy-")) / "stacks.txt"
    with servers.running(srv):
        vocab = 8192
        asyncio.run(loadgen.run_load(srv.url, srv.model, random_prompts(C, L, vocab, seed=5), 8, C))
        n = max(C, int(args.seconds * 40 / max(new, 1)) * C)
        prompts = random_prompts(n, L, vocab, seed=6)
        result = {}
        load = threading.Thread(target=lambda: result.update(asyncio.run(
            loadgen.run_load(srv.url, srv.model, prompts, new, C))))
        load.start()
        time.sleep(1.0)
        subprocess.run([exe, "record", "--pid", str(srv.proc.pid), "--duration", str(args.seconds), "--rate", "200",
                        "--format", "raw", "--threads", "--nonblocking", "-o", str(raw)], check=True,
                       capture_output=True)
        load.join()
    return summarize_stacks(raw, result)


def summarize_stacks(raw: Path, result: dict) -> dict:
    threads: collections.Counter = collections.Counter()
    funcs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        total += n
        threads[thread] += n
        for f in {fr.split(" (")[0] for fr in frames[1:]}:
            funcs[thread][f] += n
    rows = []
    for thread, n in threads.most_common(4):
        rows.append({"thread": thread[:40], "function": "(all)", "share": n / total})
        for f, m in funcs[thread].most_common(12):
            rows.append({"thread": "", "function": f[:70], "share": m / total})
    print_table(f"py-spy on the server under load ({result.get('output_tok_s', 0):.1f} tok/s): share of samples "
                "(inclusive)", [("thread", "thread", ""), ("function", "function", ""), ("share", "share", ".1%")],
                rows)
    return {"rows": rows, "load": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["engine", "dsa", "server", "steps"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="batch sizes (steps)")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=0, help="MTP draft tokens (engine profile)")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--baseline", type=Path, help="steps: a checkout whose code to compare against (A/B)")
    ap.add_argument("--repeats", type=int, default=3, help="steps --baseline: alternating runs of each")
    ap.add_argument("--detokenize", choices=["api", "engine"], default="api",
                    help="steps: where text is made: the API process, as the server does (not in the step), or "
                         "the engine's step (before it moved out)")
    args = ap.parse_args(argv)
    threads = pin_threads(args.threads)
    steps = compare_steps if args.baseline is not None else profile_steps
    res = {"engine": profile_engine, "dsa": profile_dsa, "server": profile_server, "steps": steps}[args.what](args)
    name = f"profile_{args.what}" + (f"_k{args.k}" if args.what == "engine" and args.k else "")
    opts = {k: v for k, v in vars(args).items() if k not in ("threads", "out_dir")} | {"model": str(args.model)}
    print(f"wrote {write_result(name, [], meta(threads, **opts), res, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
