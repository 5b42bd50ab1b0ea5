"""Tensor parallelism on a multi-GPU machine (run through bench/gpu.sh when `nvidia-smi -L` lists >= 2 GPUs).

    python bench/tp_bench.py [--world N] [--cpu-smoke] [--out-dir DIR] [--budget-s S]

Every run goes through `LLMEngine` with `tensor_parallel_size` N, as a server would: rank 0 (the engine, in a
spawned process) spawns ranks 1..N-1 itself, NCCL on CUDA with one GPU per rank (gloo on the CPU), and each rank
loads its shard of the same random GlmMoeDsa checkpoint through the real sharded load path. The TP 1 reference is
the same engine with tensor_parallel_size 1, on rank 0's device, run before or after (never beside) the TP N one.

1. correctness, fp32: logits of one prompt longer than index_topk (DSA selecting) through rank 0's model calls
   (broadcast to the other ranks as the step plan), max |diff| and argmax agreement, TP N vs TP 1; greedy tokens
   of 4 prompts longer than index_topk, 16 steps each, through the engine's own step loop: identical or not;
2. timing, bf16 (fp32 in the smoke): median steady decode step of the engine at batch 1 and 32, TP N vs TP 1.

GPU: the ~1B ONE_B config of gpu_bench.py (16 heads, 16 experts: N in 2, 4, 8, 16). `--cpu-smoke`: gloo, world 2,
the tiny SMOKE_1B config, batches 1 and 4; checks the script only. Prints a table, writes DIR/tp_gpu.json
(smoke: tp_gpu-smoke.json), rewritten after every step so a run cut short by its timeout still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_bench import ONE_B, SMOKE_1B, random_checkpoint, run_engine  # noqa: E402
from model.batch import ForwardBatch  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import LLMEngine  # noqa: E402

GREEDY_STEPS = 16
GREEDY_PROMPTS = 4


def sizes(smoke: bool, topk: int) -> dict:
    """Prompt lengths past index_topk (so the indexer selects), the decode-timing shapes, the cache to hold them."""
    s = dict(logit_len=topk + (24 if smoke else 512), greedy_len=topk + (8 if smoke else 64),
             batches=[1, 4] if smoke else [1, 32], prompt_len=16 if smoke else 128, new=8 if smoke else 64)
    s["max_model_len"] = s["logit_len"] + GREEDY_STEPS + 8
    s["kv_cache_tokens"] = max(GREEDY_PROMPTS * (s["greedy_len"] + GREEDY_STEPS + 16),
                               max(s["batches"]) * (s["prompt_len"] + s["new"] + 16), s["max_model_len"] + 16)
    return s


def _engine_main(ckpt: str, world: int, device: str, dtype: str, tasks: list[str], sz: dict, out: str) -> None:
    """Rank 0: one engine at `world`, the tasks asked for; results to `out` (torch.save)."""
    if device == "cpu":
        torch.set_num_threads(1)
    engine = LLMEngine.from_config(EngineConfig(
        model=Path(ckpt), device=device, dtype=dtype, tensor_parallel_size=world, max_num_seqs=max(sz["batches"]),
        max_model_len=sz["max_model_len"], kv_cache_tokens=sz["kv_cache_tokens"],
        torch_threads=1 if device == "cpu" else None))
    res: dict = {}
    try:
        vocab = engine.model_config.vocab_size
        dev = engine.runner.device
        if "correct" in tasks:
            T = sz["logit_len"]
            ids = torch.randint(16, vocab, (T,), generator=torch.Generator().manual_seed(0))
            model = engine.runner.model  # at world > 1 each call is broadcast to the other ranks first
            with torch.inference_mode():
                res["logits"] = model.logits(model(ids.to(dev), ForwardBatch.single(T, device=dev))).float().cpu()
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(16, vocab, (sz["greedy_len"],), generator=g).tolist()
                       for _ in range(GREEDY_PROMPTS)]
            res["greedy"] = run_engine(engine, prompts, GREEDY_STEPS)[1]
        if "timing" in tasks:
            res["decode"] = {}
            for B in sz["batches"]:
                g = torch.Generator().manual_seed(B)
                prompts = [torch.randint(16, vocab, (sz["prompt_len"],), generator=g).tolist() for _ in range(B)]
                run_engine(engine, prompts[:1], 4)  # warm-up
                steps = run_engine(engine, prompts, sz["new"])[0]
                steady = sorted(steps[len(steps) // 4:-2] or steps)  # decode steps, not the prefill
                res["decode"][B] = steady[len(steady) // 2] * 1000
    finally:
        engine.close()
    torch.save(res, out)


def run_engine_process(ckpt: Path, world: int, device: str, dtype: str, tasks: list[str], sz: dict, tmp: Path,
                       timeout_s: float) -> dict:
    """`_engine_main` in a spawned process (this one's torch.distributed state stays clean); killed past
    `timeout_s`, taking its ranks with it (they time out on the lost rank 0 otherwise)."""
    out = tmp / f"w{world}-{dtype}-{'-'.join(tasks)}.pt"
    proc = mp.get_context("spawn").Process(target=_engine_main,
                                           args=(str(ckpt), world, device, dtype, tasks, sz, str(out)))
    proc.start()
    proc.join(max(timeout_s, 1.0))
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"the engine at tensor parallel {world} did not finish in {timeout_s:.0f} s")
    if proc.exitcode != 0:
        raise RuntimeError(f"the engine process at tensor parallel {world} failed (exit code {proc.exitcode})")
    return torch.load(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo on the CPU, world 2, tiny sizes")
    ap.add_argument("--world", type=int, default=None, help="default: every visible GPU (2 in the smoke)")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT")
                    else ROOT / "bench" / "results")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall time for the whole run")
    args = ap.parse_args(argv)
    start = time.monotonic()
    # The ranks the engine spawns run `python -m service.engine.parallel_executor`: from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    smoke = args.cpu_smoke
    if smoke:
        device, world = "cpu", args.world or 2
    else:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        world = args.world or n
        if n < 2 or world < 2 or world > n:
            raise SystemExit(f"tensor parallel {world} needs that many GPUs ({n} visible; --cpu-smoke for a CPU check)")
        device = "cuda"
    cfg = SMOKE_1B if smoke else ONE_B
    sz = sizes(smoke, cfg["index_topk"])
    fast = "float32" if smoke else "bfloat16"
    res: dict = {"name": "tp_gpu", "torch": torch.__version__, "world": world,
                 "device": "cpu (smoke, gloo)" if smoke else f"{world} x {torch.cuda.get_device_name()} (nccl)",
                 "model": "SMOKE_1B" if smoke else "ONE_B", "timing_dtype": fast, "sizes": sz}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / ("tp_gpu-smoke.json" if smoke else "tp_gpu.json")
    tmp_dir = tempfile.TemporaryDirectory(prefix="tp-bench-")
    tmp = Path(tmp_dir.name)
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731

    def step(name: str, fn):
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        print(f"[{time.perf_counter() - t:6.1f}s] {name}: {json.dumps(res[name], default=str)[:300]}", flush=True)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        return res[name]

    ckpt = step("build", lambda: str(random_checkpoint(cfg, tmp / "ckpt", "cpu" if smoke else "cuda")))
    if device == "cuda":
        torch.cuda.empty_cache()
    if not isinstance(ckpt, str) or ckpt == "None":
        print("no checkpoint (transformers missing?)")
        return 1
    runs: dict = {}
    # Smoke: one engine per world does both (same dtype). GPU: fp32 for correctness, bf16 for timing.
    plan = [("correct", "float32"), ("timing", fast)] if not smoke else [("correct+timing", "float32")]
    for what, dtype in plan:
        for w in (world, 1):
            tasks = what.split("+")

            def run(w=w, dtype=dtype, tasks=tasks) -> dict:
                got = run_engine_process(Path(ckpt), w, device, dtype, tasks, sz, tmp, left() - 5)
                runs.setdefault(w, {}).update(got)
                return {k: v for k, v in got.items() if k != "logits"}  # no tensors in the JSON

            step(f"{what}_tp{w}", run)
    a, b = runs.get(world, {}), runs.get(1, {})
    if "logits" in a and "logits" in b:
        la, lb = a["logits"], b["logits"]
        res["correctness"] = {
            "logit_tokens": la.shape[0], "index_topk": cfg["index_topk"],
            "max_abs_logit_diff_fp32": (la - lb).abs().max().item(),
            "max_abs_logit_fp32": lb.abs().max().item(),
            "argmax_agree": (la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
            "greedy_prompt_len": sz["greedy_len"], "greedy_steps": GREEDY_STEPS,
            "greedy_identical": f"{sum(x == y for x, y in zip(a['greedy'], b['greedy'], strict=True))}"
                                f"/{GREEDY_PROMPTS}"}
    rows = []
    for B in sz["batches"]:
        sa, sb = a.get("decode", {}).get(B), b.get("decode", {}).get(B)
        rows.append({"batch": B, f"tp{world}_step_ms": sa, "tp1_step_ms": sb,
                     "speedup": sb / sa if sa and sb else None})
    res["rows"] = rows
    c = res.get("correctness", {})
    print(f"\ntensor parallel {world} vs 1 ({res['device']}, model {res['model']})")
    if c:
        print(f"  logits fp32 over {c['logit_tokens']} tokens (index_topk {c['index_topk']}): max |diff| "
              f"{c['max_abs_logit_diff_fp32']:.2e} (max |logit| {c['max_abs_logit_fp32']:.2f}), argmax agree "
              f"{c['argmax_agree']:.1%}; greedy {GREEDY_STEPS} steps identical: {c['greedy_identical']}")
    else:
        print("  correctness: not measured (see the errors above)")
    print(f"  {'B':>3} {f'TP{world} step ms':>14} {'TP1 step ms':>12} {'speedup':>8}   ({fast})")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"  {r['batch']:>3} {fmt(r[f'tp{world}_step_ms'], '.2f'):>14} {fmt(r['tp1_step_ms'], '.2f'):>12} "
              f"{fmt(r['speedup'], '.2f'):>7}x")
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    ok = bool(c) and c["greedy_identical"] == f"{GREEDY_PROMPTS}/{GREEDY_PROMPTS}"
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
