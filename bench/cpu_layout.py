"""float32 weights as stored ([out, in]) or stored transposed (model/cpu_layout.py), side by side in one process.

    python bench/cpu_layout.py [--model DIR] [--threads 1] [--repeats 5] [--batch 1 4 16] [--name cpu_layout]

1. Each linear shape of the model and its routed experts' grouped GEMM at a few rows, both layouts, with the CPU's
   caches flushed before every call (a decode step reads its weights from memory) and hot (the same call
   repeated): medians, us.
2. The engine on the model (K = 0 and the default adaptive MTP), greedy closed loops of B requests on held-out
   code prompts, the two layouts alternating on the same engine (`cpu_layout.set_transposed`), medians of
   `--repeats` after a warm-up round; tok/s, the ratio, and whether the greedy tokens are the same.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import checkpoints
import torch
import torch.nn.functional as F
from common import RESULTS, meta, pin_threads, print_table, write_result
from engine_runs import alternate

from model import cpu_layout

FLUSH_BYTES = 96 << 20  # more than this machine's last-level cache (32 MiB on the EPYC)


def _median_us(fn, calls: int, flush: torch.Tensor | None) -> float:
    fn()
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.add_(1.0)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def micro(cfg, rows: list[int], calls: int) -> list[dict]:
    """Both layouts per weight shape and row count, cold and hot."""
    g = torch.Generator().manual_seed(0)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    shapes = {"q_a_proj": (cfg.q_lora_rank, H), "kv_a_proj": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H),
              "dense gate/up": (cfg.intermediate_size, H), "dense down": (H, cfg.intermediate_size),
              "shared expert down": (H, I)}
    flush = torch.zeros(FLUSH_BYTES // 4)
    out = []
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i, generator=g)
        wt = cpu_layout.transposed(w)
        for m in rows:
            x = torch.randn(m, i, generator=g)
            out.append(_row(name, f"{o}x{i}", m, lambda x=x, w=w: F.linear(x, w), lambda x=x, w=wt: F.linear(x, w),
                            calls, flush))
    w1, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    t1, t2 = cpu_layout.transposed(w1), cpu_layout.transposed(w2)
    mm = torch.nn.functional.grouped_mm if hasattr(F, "grouped_mm") else None
    for m in rows if mm is not None else []:
        slots = 2 * m  # top-2 of the shipped model: two expert rows per token
        ids = torch.randint(0, E, (slots,), generator=g).sort().values
        ends = torch.searchsorted(ids, torch.arange(1, E + 1), out_int32=True)
        x, h = torch.randn(slots, H, generator=g), torch.randn(slots, I, generator=g)

        def experts(a, b, x=x, h=h, ends=ends):
            return mm(x, a.transpose(1, 2), offs=ends), mm(h, b.transpose(1, 2), offs=ends)

        out.append(_row("routed experts (grouped)", f"{E}x{2 * I}x{H} + {E}x{H}x{I}", m,
                        lambda: experts(w1, w2), lambda: experts(t1, t2), calls, flush))
    return out


def _row(name: str, shape: str, rows: int, stored, transposed, calls: int, flush: torch.Tensor) -> dict:
    cold = [_median_us(f, calls, flush) for f in (stored, transposed)]
    hot = [_median_us(f, calls, None) for f in (stored, transposed)]
    return {"weight": name, "shape": shape, "rows": rows, "cold_stored_us": cold[0], "cold_transposed_us": cold[1],
            "cold_ratio": cold[0] / cold[1], "hot_stored_us": hot[0], "hot_transposed_us": hot[1],
            "hot_ratio": hot[0] / hot[1]}


def engine_ab(model: Path, args) -> list[dict]:
    rows = alternate(model, lambda engine, on: cpu_layout.set_transposed(engine.runner.model, on), args.batch,
                     args.prompts, args.prompt_tokens, args.max_tokens, args.repeats)
    return [{**r, "stored_tok_s": r.pop("off_tok_s"), "transposed_tok_s": r.pop("on_tok_s")} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 16])
    ap.add_argument("--calls", type=int, default=30, help="timed calls per micro row and layout")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--name", default="cpu_layout", help="results file name")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = pin_threads(args.threads)
    model = checkpoints.model_or_shipped(args.model)
    from model.config import ModelConfig

    table = micro(ModelConfig.from_dir(model), args.rows, args.calls)
    columns = [("weight", "weight", ""), ("shape", "shape", ""), ("rows", "rows", "d"),
               ("cold_stored_us", "cold stored", ".1f"), ("cold_transposed_us", "cold transposed", ".1f"),
               ("cold_ratio", "cold speed-up", ".2fx"), ("hot_stored_us", "hot stored", ".1f"),
               ("hot_transposed_us", "hot transposed", ".1f"), ("hot_ratio", "hot speed-up", ".2fx")]
    print_table(f"F.linear / grouped GEMM, float32 weights as stored vs stored transposed, medians us, {threads} "
                "thread(s)", columns, table)
    ab = engine_ab(model, args)
    print_table(f"engine, greedy closed loops, code prompts x {args.max_tokens} tokens, medians of {args.repeats}",
                [("k", "K", ""), ("batch", "B", "d"), ("stored_tok_s", "stored tok/s", ".1f"),
                 ("transposed_tok_s", "transposed tok/s", ".1f"), ("ratio", "transposed / stored", ".2fx"),
                 ("per_repeat", "per repeat", ""), ("same_tokens", "same tokens", "")], ab)
    write_result(args.name, table + ab, meta(threads, model=str(model)), out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
