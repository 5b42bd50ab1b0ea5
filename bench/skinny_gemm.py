"""Skinny products on this CPU: F.linear vs W @ x^T for the few rows of a decode step, and what the choice
`model.layers.skinny_wx_pays` makes buys the engine (side by side, one process).

    python bench/skinny_gemm.py [--model DIR] [--threads 1] [--repeats 3] [--max-tokens 64] [--name skinny_gemm]

1. Hot medians (us) of both ways for each linear shape of the model at 1, 2, 3, 4 and 8 rows (1 row: W @ x^T on
   the row duplicated to two, the LM head's `pad_single`), fp32 and bf16, and what the once-per-process timing
   decided; beside them the oneDNN product on a copy of the weight reordered once (`PrepackedLinear`, what the LM
   head runs; bf16 only on a CPU with bf16 units).
2. Greedy closed loops at batch 1 on held-out code prompts, K = 0 and K = 1 (MTP, fixed), alternating between
   "W @ x^T always" (the rule before: it was measured on an AMD EPYC) and "timed" (this CPU's choice), medians of
   `--repeats`; tok/s and the ratio. Greedy tokens are compared too.
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
from engine_runs import closed_loop, prompt_set

from model import layers


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of the model's linear weights, named as in the checkpoint."""
    H = cfg.hidden_size
    heads = cfg.num_attention_heads
    return {"q_a_proj": (cfg.q_lora_rank, H), "q_b_proj": (heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim),
                                                            cfg.q_lora_rank),
            "kv_a_proj": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), "o_proj": (H, heads * cfg.v_head_dim),
            "dense gate_up": (2 * cfg.intermediate_size, H), "dense down": (H, cfg.intermediate_size),
            "shared gate_up": (2 * cfg.moe_intermediate_size, H), "lm_head": (cfg.vocab_size, H)}


def hot_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def micro(cfg) -> list[dict]:
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (o, i) in shapes(cfg).items():
            w = torch.randn(o, i, generator=g).to(dtype)
            packable = layers._onednn_linear_available() if dtype == torch.float32 else layers._onednn_bf16_available()
            packed = torch.ops.mkldnn._reorder_linear_weight(w, layers.PACK_BATCH_HINT) if packable else None
            for r in (1, 2, 3, 4, 8):
                x = torch.randn(r, i, generator=g).to(dtype)
                xx = x.expand(2, -1).contiguous() if r == 1 else x
                calls = 20 if o * i > 1 << 20 else 200
                a = hot_us(lambda: F.linear(x, w), calls)  # noqa: B023
                b = hot_us(lambda: torch.mm(w, xx.t())[:, :r].t().contiguous(), calls)  # noqa: B023
                # what PrepackedLinear runs for the LM head (oneDNN, the weight reordered once)
                c = hot_us(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),  # noqa: B023
                           calls) if packed is not None else None
                rows_out.append({"dtype": str(dtype).removeprefix("torch."), "weight": name, "shape": f"{o}x{i}",
                                 "rows": r, "f_linear_us": a, "wx_us": b, "wx_speedup": a / b, "packed_us": c})
    return rows_out


def engine_ab(model, args) -> list[dict]:
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    timed = layers.skinny_wx_pays
    modes = {"W @ x^T always": lambda dtype, tall: True, "timed": timed}
    out = []
    for k in (0, 1):
        engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_tokens=16384,
                                                    num_speculative_tokens=k, speculative_policy="fixed"))
        prompts = prompt_set("code", model, args.prompts, args.prompt_tokens)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        tokens: dict[str, list] = {}
        try:
            for rep in range(args.repeats + 1):  # the first round warms up
                for mode, fn in modes.items():
                    layers.skinny_wx_pays = fn
                    run = closed_loop(engine, prompts, args.max_tokens, 1, prefix=f"{mode}{rep}-")
                    if rep:
                        rates[mode].append(run.output_tokens / run.seconds)
                    tokens[mode] = run.tokens
        finally:
            layers.skinny_wx_pays = timed
        before, after = (statistics.median(rates[m]) for m in modes)
        out.append({"k": k, "wx_always_tok_s": before, "timed_tok_s": after, "ratio": after / before,
                    "same_tokens": tokens["W @ x^T always"] == tokens["timed"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--name", default="skinny_gemm", help="results file name")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = pin_threads(args.threads)
    model = checkpoints.model_or_shipped(args.model)
    from model.config import ModelConfig

    cfg = ModelConfig.from_dir(model)
    decided = {f"{d}{' tall' if t else ''}": layers.skinny_wx_pays(getattr(torch, d), t)
               for d in ("float32", "bfloat16") for t in (False, True)}
    table = micro(cfg)
    print_table(f"F.linear vs W @ x^T, hot medians, {threads} thread(s); W @ x^T chosen: {decided}",
                [("dtype", "dtype", ""), ("weight", "weight", ""), ("shape", "out x in", ""), ("rows", "rows", "d"),
                 ("f_linear_us", "F.linear us", ".1f"), ("wx_us", "W@x^T us", ".1f"),
                 ("wx_speedup", "W@x^T speed-up", ".2fx"), ("packed_us", "oneDNN reordered us", ".1f")], table)
    ab = engine_ab(model, args)
    print_table(f"engine, batch 1, greedy, {args.prompts} code prompts x {args.max_tokens} tokens, medians of "
                f"{args.repeats}", [("k", "K", "d"), ("wx_always_tok_s", "W@x^T always tok/s", ".1f"),
                                    ("timed_tok_s", "timed tok/s", ".1f"), ("ratio", "timed / always", ".2fx"),
                                    ("same_tokens", "same tokens", "")], ab)
    write_result(args.name, table + ab, meta(threads, decided=decided, model=str(model)), out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
