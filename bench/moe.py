"""Routed experts: torch's grouped GEMM (one call per projection, offsets on the device) against the per-expert
Python loop (one product per expert with tokens, after reading the counts back), on the same weights and routing.

    python bench/moe.py [--tokens 1 16 64 512] [--repeats 5] [--dtype float32] [--device cpu] [--threads 2]
                        [--shapes shipped glm5-scaled [glm5]] [--name moe] [--out-dir DIR]

Shapes: the shipped model's MoE layer (hidden 256, 8 experts of 160, top-2), a GLM-5-like layer scaled down
(hidden 1024, 64 experts of 256, top-8) and, for GPUs (bench/gpu.sh), GLM-5's own (6144, 256 of 2048, top-8).
Routing is uniform random, one draw per token count (distinct experts per token). Per row: the median and the
best of `--repeats` calls of each path, alternating loop and grouped so drift hits both alike, and their outputs'
max |diff|. Writes bench/results/NAME.json (machine load in its meta: the training run may share the CPU; on a
busy machine the best of the repeats is the steadier figure, since contention only adds time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import DEFAULT_THREADS, meta, pin_threads, print_table, warn_if_busy, write_result

SHAPES = {  # name: (hidden, experts, expert intermediate, experts per token)
    "shipped": (256, 8, 160, 2),
    "glm5-scaled": (1024, 64, 256, 8),
    "glm5": (6144, 256, 2048, 8),  # GLM-5's own layer (GPU runs: bench/gpu.sh)
}
COLUMNS = [("shape", "shape", ""), ("tokens", "tokens", "d"), ("experts_used", "experts used", "d"),
           ("loop_ms", "loop ms", ".3f"), ("grouped_ms", "grouped ms", ".3f"), ("speedup", "loop/grouped", ".2fx"),
           ("best_loop_ms", "best loop", ".3f"), ("best_grouped_ms", "best grouped", ".3f"),
           ("best_speedup", "best l/g", ".2fx"), ("max_abs_diff", "max |diff|", ".1e")]


def build(shape: tuple[int, int, int, int], dtype, device: str, seed: int = 0):
    """An `Experts` layer with random weights (the shipped config with the shape's sizes)."""
    import torch

    from model.config import ModelConfig
    from model.moe import Experts

    H, E, I, k = shape
    cfg = ModelConfig.from_dict({
        "model_type": "glm_moe_dsa", "vocab_size": 64, "hidden_size": H, "intermediate_size": 2 * I,
        "moe_intermediate_size": I, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": E, "num_experts_per_tok": k, "n_shared_experts": 1, "kv_lora_rank": 16,
        "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "index_topk": 8,
        "index_head_dim": 16, "index_n_heads": 4, "first_k_dense_replace": 1, "max_position_embeddings": 64})
    with torch.device("meta"):  # then filled on the device in the serving dtype: GLM-5's own shape is 19 GB
        ex = Experts(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, scale in (("gate_up_proj", H**-0.5), ("down_proj", I**-0.5)):
        shape = getattr(ex, name).shape
        w = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(scale)
        setattr(ex, name, torch.nn.Parameter(w, requires_grad=False))
    return ex.eval()


def routing(n: int, E: int, k: int, H: int, dtype, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(n, k, generator=g)
    x = torch.randn(n, H, generator=g)
    return x.to(device=device, dtype=dtype), w.to(device), ids.to(device)


def measure(ex, x, w, ids, repeats: int, sync) -> dict:
    import torch

    times = {"loop": [], "grouped": []}
    outs = {}
    with torch.inference_mode():
        for impl in times:  # warm-up (and the grouped GEMM's one-time check)
            ex.impl = impl
            outs[impl] = ex(x, w, ids)
        for _ in range(repeats):
            for impl in times:
                ex.impl = impl
                sync()
                t = time.perf_counter()
                ex(x, w, ids)
                sync()
                times[impl].append(time.perf_counter() - t)
    ex.impl = "auto"
    loop, grouped = (statistics.median(times[i]) * 1000 for i in ("loop", "grouped"))
    best_loop, best_grouped = (min(times[i]) * 1000 for i in ("loop", "grouped"))
    return {"experts_used": int(ids.unique().numel()), "loop_ms": loop, "grouped_ms": grouped,
            "speedup": loop / grouped, "best_loop_ms": best_loop, "best_grouped_ms": best_grouped,
            "best_speedup": best_loop / best_grouped,
            "max_abs_diff": (outs["loop"].float() - outs["grouped"].float()).abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--shapes", nargs="+", default=["shipped", "glm5-scaled"], choices=list(SHAPES))
    ap.add_argument("--name", default="moe", help="result file NAME.json")
    ap.add_argument("--out-dir", type=Path, default=None, help="default bench/results")
    args = ap.parse_args(argv)
    import torch

    from model import grouped_gemm

    threads = pin_threads(args.threads)
    warn_if_busy()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    device = torch.device(args.device)
    if not grouped_gemm.works(device.type, device.index, dtype):
        raise SystemExit(f"this torch has no grouped GEMM for {args.dtype} on {args.device}: nothing to compare")
    rows = []
    for name in args.shapes:
        H, E, I, k = SHAPES[name]
        ex = build(SHAPES[name], dtype, args.device)
        for n in args.tokens:
            x, w, ids = routing(n, E, k, H, dtype, args.device, seed=n)
            rows.append({"shape": f"{name} H{H} E{E} I{I} k{k}", "tokens": n,
                         **measure(ex, x, w, ids, args.repeats, sync)})
        del ex
    print_table(f"MoE experts: per-expert loop vs grouped GEMM ({args.dtype}, {args.device}, {threads} threads; "
                f"median of {args.repeats})", COLUMNS, rows)
    m = meta(threads, dtype=args.dtype, device=args.device, repeats=args.repeats)
    print(f"load average (1m/5m): {m['loadavg_1m']}/{m['loadavg_5m']}; trainer running: {m['trainer_running']}")
    write_result(args.name, rows, m, {"speedup_by_row": {f"{r['shape']} x{r['tokens']}": round(r["speedup"], 3)
                                                         for r in rows}}, out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
