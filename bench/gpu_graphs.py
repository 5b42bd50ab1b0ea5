"""The engine's CUDA graphs on a GPU (service/engine/cuda_graphs.py): tokens and speed against --enforce-eager.

    python bench/gpu_graphs.py [--cpu-smoke] [--out-dir DIR]      # bench/gpu.sh runs it on the GPU machine

1. tokens: the shipped model in fp32 on CUDA, 8 greedy requests (prompts of 20-300 tokens, so contexts cross
   index_topk and DSA selects), 48 new tokens each, with graphs and eagerly, at K = 0 and with adaptive MTP
   (the default): requests whose tokens are identical, the buckets of the forward's graphs and of the MTP
   layer's draft graphs, and any bucket that disagreed with eager or failed to capture (`broken`);
2. speed: bf16, batch 1 and 32, 128-token prompts, 128 new tokens, greedy: output tokens/s and the median
   steady step, graphs against eager, at K = 0 and with the default MTP; the buckets captured, and the share of
   steps the adaptive policy drafted in (with drafts eager, and replayed: whether drafting pays on the GPU).
Imports only model/ and service/engine/. `--cpu-smoke` runs it on the CPU with the graph runner emulated (the
same padding and refills, no capture) to check the script. Writes DIR/gpu_graphs.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_bench import run_engine  # noqa: E402

from service.engine import engine as engine_mod  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import LLMEngine  # noqa: E402

MODEL = ROOT / "model" / "weights" / "glm-5-tiny-py"


def run(engine: LLMEngine, prompts: list[list[int]], new: int) -> tuple[float, list[float], list[list[int]]]:
    """(seconds, step seconds, tokens per request) of a closed batch of greedy requests."""
    t = time.perf_counter()
    steps, tokens = run_engine(engine, prompts, new)
    return time.perf_counter() - t, steps, tokens


def make(device: str, dtype: str, eager: bool, k: int | None, batch: int, max_len: int) -> LLMEngine:
    spec = {} if k is None else {"num_speculative_tokens": k}
    return LLMEngine.from_config(EngineConfig(model=MODEL, device=device, dtype=dtype, enforce_eager=eager,
                                              max_num_seqs=batch, max_model_len=max_len,
                                              kv_cache_tokens=batch * (max_len + 32), **spec))


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(16, vocab, (n,), generator=g).tolist() for n in lengths]


def tokens_check(device: str, smoke: bool) -> list[dict]:
    lengths = [20, 60, 100, 140, 180, 220, 260, 300][: 4 if smoke else 8]
    new = 8 if smoke else 48
    rows = []
    for k in (0, None):
        toks = {}
        for eager in (True, False):
            eng = make(device, "float32", eager, k, len(lengths), max(lengths) + new + 8)
            toks[eager] = run(eng, prompts_of(lengths, eng.model_config.vocab_size, 0), new)[2]
            if not eager:
                buckets = sorted(eng.runner.graphs.buckets)
                drafts = eng.runner.draft_graphs  # the MTP layer's draft steps (None at K = 0)
                draft_buckets = sorted(drafts.buckets) if drafts is not None else []
                broken = [key for g in (eng.runner.graphs, drafts) if g is not None
                          for key, b in g.buckets.items() if b.broken]
            del eng
        same = sum(a == b for a, b in zip(toks[True], toks[False], strict=True))
        rows.append({"k": "default" if k is None else k, "same": f"{same}/{len(lengths)}", "buckets": buckets,
                     "draft_buckets": draft_buckets, "broken": broken})
    return rows


def speed(device: str, dtype: str, smoke: bool) -> list[dict]:
    prompt_len, new = (16, 8) if smoke else (128, 128)
    rows = []
    for B in (1, 4) if smoke else (1, 32):
        for k in (0, None):
            res = {}
            for eager in (True, False):
                eng = make(device, dtype, eager, k, B, prompt_len + new + 8)
                prompts = prompts_of([prompt_len] * B, eng.model_config.vocab_size, B)
                run(eng, prompts[:1], 4)  # warm-up (and the first graphs' captures)
                secs, steps, toks = run(eng, prompts, new)
                steady = sorted(steps[len(steps) // 4:-2] or steps)
                # How often the adaptive policy drafted at all (its per-bucket counts of each depth chosen).
                counts = [b.chosen for b in getattr(getattr(eng.spec, "policy", None), "buckets", {}).values()]
                chosen = [sum(c) for c in zip(*counts, strict=True)]
                res[eager] = {"tok_s": sum(map(len, toks)) / secs, "step_ms": 1000 * steady[len(steady) // 2],
                              "tokens": toks, "drafted": 1 - chosen[0] / sum(chosen) if sum(chosen) else 0.0,
                              "buckets": len(eng.runner.graphs.buckets) if eng.runner.graphs is not None else 0}
                del eng
            same = sum(a == b for a, b in zip(res[True]["tokens"], res[False]["tokens"], strict=True))
            rows.append({"batch": B, "k": "default" if k is None else k, "eager_tok_s": res[True]["tok_s"],
                         "graph_tok_s": res[False]["tok_s"], "speedup": res[False]["tok_s"] / res[True]["tok_s"],
                         "eager_step_ms": res[True]["step_ms"], "graph_step_ms": res[False]["step_ms"],
                         "buckets": res[False]["buckets"], "same_bf16": f"{same}/{B}",
                         "drafted_eager": res[True]["drafted"], "drafted_graphs": res[False]["drafted"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:  # the graph runner's CPU stand-in: same padding and refills, no capture
        engine_mod.graph_mode = lambda config, device: None if config.enforce_eager else "emulate"
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu-smoke for a CPU check of the script)")
    device = "cpu" if smoke else "cuda"
    res: dict = {"torch": torch.__version__, "device": "cpu (smoke)" if smoke else torch.cuda.get_device_name()}
    t = time.perf_counter()
    res["tokens_fp32"] = tokens_check(device, smoke)
    print(f"[{time.perf_counter() - t:5.1f}s] tokens, graphs vs eager (fp32): {res['tokens_fp32']}", flush=True)
    t = time.perf_counter()
    res["speed"] = speed(device, "float32" if smoke else "bfloat16", smoke)
    print(f"[{time.perf_counter() - t:5.1f}s] speed", flush=True)
    print(f"\n{'B':>3} {'K':>8} {'eager tok/s':>11} {'graph tok/s':>11} {'speedup':>8} {'eager ms':>9} "
          f"{'graph ms':>9} {'buckets':>7} {'same bf16':>9} {'drafted eager/graphs':>20}")
    for r in res["speed"]:
        print(f"{r['batch']:>3} {r['k']!s:>8} {r['eager_tok_s']:>11.1f} {r['graph_tok_s']:>11.1f} "
              f"{r['speedup']:>7.2f}x {r['eager_step_ms']:>9.2f} {r['graph_step_ms']:>9.2f} {r['buckets']:>7} "
              f"{r['same_bf16']:>9} {r['drafted_eager']:>9.0%} / {r['drafted_graphs']:.0%}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / ("gpu_graphs-smoke.json" if smoke else "gpu_graphs.json")
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
