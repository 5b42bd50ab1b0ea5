"""torch.compile (inductor) of the decode forward against eager: what vLLM's CPU backend does at start-up, tried here.

    python bench/compile.py [--model DIR] [--batches 1 16] [--pairs 6] [--threads 1]

The hidden-64 random checkpoint by default (bench/checkpoints.py: a step is mostly per-op overhead, where fusing
should pay most). Per batch size B: an engine prefills B random 128-token prompts, and the decode forward of its
next step (input ids and ForwardBatch captured from the runner) is run by the eager model and by
`torch.compile(model, dynamic=True)`, alternating in this process, `--pairs` pairs of 20 forwards; per row the
first compiled call's seconds (the compile), the largest difference from eager, medians and the median of the
per-pair eager/compiled ratios. The routed experts stay eager: the grouped GEMM's fake-tensor kernel refuses
fp32 under dynamo. Writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import checkpoints
import torch
from common import RESULTS, meta, pin_threads, print_table, write_result
from engine_runs import random_prompts

COLUMNS = [("batch", "B", "d"), ("compile_s", "first call s", ".1f"), ("max_abs_diff", "max |diff|", ".1e"),
           ("eager_ms", "eager ms", ".2f"), ("compiled_ms", "compiled ms", ".2f"),
           ("eager_over_compiled", "eager/compiled", ".2fx"), ("ratios", "per pair", "")]


def decode_inputs(model_dir: Path, batch: int, prompt_tokens: int = 128):
    """(model, input ids, ForwardBatch) of one decode step of `batch` sequences after their prefill."""
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine
    from service.engine.sampling_params import SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=model_dir, device="cpu", max_num_seqs=batch,
                                                max_model_len=prompt_tokens + 32,
                                                kv_cache_tokens=batch * (prompt_tokens + 64), num_speculative_tokens=0))
    seen = {}
    forward = engine.runner.forward

    def capture(ids, step):
        seen["step"] = (ids, step.batch(engine.runner.cache))
        return forward(ids, step)

    engine.runner.forward = capture
    for i, p in enumerate(random_prompts(batch, prompt_tokens, engine.model_config.vocab_size, seed=batch)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for _ in range(4):  # the prefill, then decode steps
        engine.step()
    return engine.runner.model, *seen["step"]


def row(model_dir: Path, batch: int, pairs: int) -> dict:
    model, ids, fb = decode_inputs(model_dir, batch)
    with torch.inference_mode():
        compiled = torch.compile(model, dynamic=True)
        want = model(ids, fb).clone()
        t = time.perf_counter()
        got = compiled(ids, fb)
        first = time.perf_counter() - t
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for i in range(pairs):
            order = (("eager", model), ("compiled", compiled))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                for _ in range(3):
                    fn(ids, fb)
                t = time.perf_counter()
                for _ in range(20):
                    fn(ids, fb)
                times[name].append((time.perf_counter() - t) / 20 * 1000)
    ratios = sorted(e / c for e, c in zip(times["eager"], times["compiled"], strict=True))
    return {"batch": batch, "compile_s": first, "max_abs_diff": (got - want).abs().max().item(),
            "eager_ms": statistics.median(times["eager"]), "compiled_ms": statistics.median(times["compiled"]),
            "eager_over_compiled": statistics.median(ratios), "ratios": " ".join(f"{r:.2f}" for r in ratios)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a checkpoint (default: a random hidden-64 one)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    threads = pin_threads(args.threads)
    from model import moe

    moe.Experts.forward = torch.compiler.disable(moe.Experts.forward)
    tmp = tempfile.TemporaryDirectory(prefix="compile-")
    model_dir = args.model or checkpoints.glm_checkpoint(Path(tmp.name) / "h64", hidden_size=64)
    rows = [row(model_dir, B, args.pairs) for B in args.batches]
    print_table(f"decode forward, eager vs torch.compile(dynamic=True), {threads} thread(s), "
                f"{args.model or 'hidden-64 random checkpoint'}", COLUMNS, rows)
    print(f"wrote {write_result('compile', rows, meta(threads, model=str(args.model)), None, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
