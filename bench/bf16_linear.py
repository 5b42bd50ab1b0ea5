"""bfloat16 on the CPU: products through oneDNN with the weight reordered once (`PrepackedLinear`) vs F.linear.

    python bench/bf16_linear.py [--threads 1] [--repeats 4] [--model DIR]

products: each dense weight shape of the shipped model and its LM head at 1, 4, 16, 64 rows: float32 as served
(`linear`, or the reordered copy for the head), bf16 F.linear (torch's own oneDNN call, which reorders
the weight each time) and bf16 through a reordered copy (what the wrapper would do for any weight; it serves only
weights of PACK_MIN_ELEMENTS and more, i.e. the head); hot medians. engine: LLMEngine in bf16 on the shipped
model, closed loops of 32 greedy tokens at C = 1 and 16, the head's reordered path on and off in one process,
alternating `--repeats` times; median tokens/s of each. Writes bench/results/bf16_linear.json. Needs a CPU with
bf16 units (AVX512-BF16 or AMX); elsewhere the bf16 path is plain F.linear and there is nothing to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
from common import RESULTS, meta, pin_threads, print_table, write_result  # noqa: E402
from engine_runs import closed_loop, random_prompts  # noqa: E402

from model import layers  # noqa: E402

SHAPES = [(256, 640), (640, 256), (256, 8192), (128, 384)]  # (in, out): MLP up/down, LM head, q_b


def timed_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            fn()
        runs.append((time.perf_counter() - t) / (n // 5) * 1e6)
    return statistics.median(runs)


def products() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for i, o in SHAPES:
            w32 = torch.randn(o, i, generator=g) * 0.05
            w16 = w32.bfloat16()
            served = layers.PrepackedLinear()  # what the head runs in fp32 (other weights fall through to linear)
            reordered = torch.ops.mkldnn._reorder_linear_weight(w16, layers.PACK_BATCH_HINT)
            for n in (1, 4, 16, 64):
                x32 = torch.randn(n, i, generator=g)
                rows.append(measure(f"{i}x{o}", x32, w32, served, w16, reordered))
    return rows


def measure(shape: str, x32: torch.Tensor, w32: torch.Tensor, served: layers.PrepackedLinear, w16: torch.Tensor,
            reordered: torch.Tensor) -> dict:
    x16 = x32.bfloat16()
    r = {"shape": shape, "rows": x32.shape[0], "fp32_us": timed_us(lambda: served(x32, w32)),
         "bf16_f_linear_us": timed_us(lambda: F.linear(x16, w16)),
         "bf16_packed_us": timed_us(lambda: torch.ops.mkldnn._linear_pointwise(x16, reordered, None, "none", [], ""))}
    r["packed_vs_f_linear"] = r["bf16_f_linear_us"] / r["bf16_packed_us"]
    r["packed_vs_fp32"] = r["fp32_us"] / r["bf16_packed_us"]
    return r


def engine_ab(model: Path, repeats: int) -> list[dict]:
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="bfloat16", max_num_seqs=64,
                                                kv_cache_tokens=65536, num_speculative_tokens=0))
    real = layers._onednn_bf16_available
    tok_s: dict[tuple[bool, int], list[float]] = {}
    try:
        for _ in range(repeats):
            for on in (True, False):
                layers._onednn_bf16_available = real if on else (lambda: False)
                for C in (1, 16):
                    prompts = random_prompts(C, 64, engine.model_config.vocab_size, seed=C)
                    closed_loop(engine, prompts, 2, C, prefix="w")
                    t = time.perf_counter()
                    closed_loop(engine, prompts, 32, C)
                    tok_s.setdefault((on, C), []).append(C * 32 / (time.perf_counter() - t))
    finally:
        layers._onednn_bf16_available = real
    return [{"concurrency": C, "packed_tok_s": statistics.median(tok_s[(True, C)]),
             "f_linear_tok_s": statistics.median(tok_s[(False, C)]),
             "ratio": statistics.median(tok_s[(True, C)]) / statistics.median(tok_s[(False, C)]),
             "runs_packed": tok_s[(True, C)], "runs_f_linear": tok_s[(False, C)]} for C in (1, 16)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--model", type=Path, help="checkpoint for the engine A/B (default: the shipped model)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    if not layers._onednn_bf16_available():
        print("this CPU has no oneDNN bf16 path: bf16 products are plain F.linear here", file=sys.stderr)
        return 1
    prod = products()
    print_table(f"bf16 products, {args.threads} thread(s), hot medians (us)",
                [("shape", "in x out", ""), ("rows", "rows", "d"), ("fp32_us", "fp32", ".1f"),
                 ("bf16_f_linear_us", "bf16 F.linear", ".1f"), ("bf16_packed_us", "bf16 reordered", ".1f"),
                 ("packed_vs_f_linear", "vs F.linear", ".2fx"), ("packed_vs_fp32", "vs fp32", ".2fx")], prod)
    eng = [] if args.skip_engine else engine_ab(args.model or checkpoints.model_or_shipped(None), args.repeats)
    if eng:
        print_table(f"engine bf16, reordered weights on / off, medians of {args.repeats} alternations",
                    [("concurrency", "C", "d"), ("packed_tok_s", "reordered tok/s", ".1f"),
                     ("f_linear_tok_s", "F.linear tok/s", ".1f"), ("ratio", "ratio", ".2fx")], eng)
    path = write_result("bf16_linear", prod, meta(args.threads, repeats=args.repeats), {"engine": eng},
                        args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
