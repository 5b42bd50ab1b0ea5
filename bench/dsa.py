"""DSA (sparse attention over the indexer's top-k) against dense attention on the same weights.

    python bench/dsa.py [--model DIR] [--contexts 1024 2048 4096 8192 16384 32768] [--chunk 2048]
                        [--prefill-repeats 3] [--decode-rounds 5] [--decode-steps 4] [--threads 2]

Without --model: a random GlmMoeDsa checkpoint with the default model's config (index_topk 64) and
max_position_embeddings raised to the longest context, written by transformers. The dense baseline is the same
checkpoint with `index_topk` >= every context (config patched, tensors shared), so its indexer is skipped and
every query reads every cached latent. Per context L and mode, on the network with a paged cache (the engine's
code path, minus scheduling): prefill = L prompt tokens in chunks of `--chunk` (the engine's chunked prefill;
2048 = its default token budget), LM head on the last row only, median of `--prefill-repeats` (one above 16K);
decode = the median of rounds x steps single-token steps at position L (after one untimed step). The two models
alternate within every repeat and round, so drift hits both alike. Target at 16K: decode <= 0.35x dense,
prefill <= 0.6x dense. Writes bench/results/dsa.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import checkpoints
from common import DEFAULT_THREADS, RESULTS, meta, pin_threads, print_table, warn_if_busy, write_result

COLUMNS = [("context", "context", "d"), ("topk", "top-k", "d"), ("sparse_prefill_s", "prefill DSA s", ".2f"),
           ("dense_prefill_s", "prefill dense s", ".2f"), ("prefill_ratio", "prefill DSA/dense", ".2fx"),
           ("sparse_decode_ms", "decode DSA ms", ".1f"), ("dense_decode_ms", "decode dense ms", ".1f"),
           ("decode_ratio", "decode DSA/dense", ".2fx"), ("read_share", "latents read", ".1%")]


def prefill(model, ids, L: int, chunk: int, block_size: int = 64):
    """Fill a fresh paged cache with L tokens in chunks; returns (cache, seconds)."""
    import torch

    from model.batch import ForwardBatch
    from model.kv_cache import KVCache

    cache = KVCache(model.config, -(-(L + 1) // block_size), block_size, torch.float32)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for start in range(0, L, chunk):
            n = min(chunk, L - start)
            hidden = model(ids[start:start + n], ForwardBatch.single(n, start, cache))
            if start + n == L:
                model.logits(hidden[-1:])
        return cache, time.perf_counter() - t0


def decode_step(model, cache, ids, L: int) -> float:
    """One decode step at position L (context L + 1); repeating it rewrites the same slot, so the context stays L."""
    import torch

    from model.batch import ForwardBatch

    with torch.inference_mode():
        t = time.perf_counter()
        model.logits(model(ids[L:L + 1], ForwardBatch.single(1, L, cache)))
        return time.perf_counter() - t


def measure(models: dict, L: int, chunk: int, prefill_repeats: int, decode_rounds: int, decode_steps: int,
            seed: int = 0) -> dict:
    """Prefill and decode for every model at context L; repeats alternate the models, so drift hits them alike."""
    import torch

    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(16, vocab, (L + 1,), generator=torch.Generator().manual_seed(seed))
    prefill_s: dict[str, list[float]] = {m: [] for m in models}
    caches = {}
    for _ in range(prefill_repeats):
        for name, model in models.items():
            caches[name], sec = prefill(model, ids, L, chunk)
            prefill_s[name].append(sec)
    decode_s: dict[str, list[float]] = {m: [] for m in models}
    for name, model in models.items():
        decode_step(model, caches[name], ids, L)  # untimed
    for _ in range(decode_rounds):
        for name, model in models.items():
            decode_s[name] += [decode_step(model, caches[name], ids, L) for _ in range(decode_steps)]
    return {name: {"prefill_s": statistics.median(prefill_s[name]), "prefill_runs": prefill_s[name],
                   "decode_ms": statistics.median(decode_s[name]) * 1000,
                   "decode_ms_runs": [x * 1000 for x in decode_s[name]]} for name in models}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GlmMoeDsa checkpoint (default: random, default config)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=4, help="decode steps per model per round")
    ap.add_argument("--decode-rounds", type=int, default=5, help="rounds alternating the models")
    ap.add_argument("--prefill-repeats", type=int, default=3, help="prefills per model (1 above 16K)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=INT",
                    help="overrides of the random checkpoint's config (e.g. hidden_size=64 for a smoke run)")
    ap.add_argument("--name", default="dsa")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warn_if_busy()
    threads = pin_threads(args.threads)
    from model.loader import load_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-dsa-")
    longest = max(args.contexts) + 64
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.config)}
    sparse_dir = args.model or checkpoints.glm_checkpoint(Path(tmp.name) / "sparse", tokenizer=False,
                                                          max_position_embeddings=longest, **overrides)
    dense_dir = checkpoints.dense_twin(sparse_dir, Path(tmp.name) / "dense", index_topk=longest)
    sparse, dense = load_model(sparse_dir).eval(), load_model(dense_dir).eval()
    topk = sparse.config.index_topk
    if sparse.config.max_position_embeddings < longest:
        raise SystemExit(f"{sparse_dir}: max_position_embeddings {sparse.config.max_position_embeddings} < {longest}")
    models = {"sparse": sparse, "dense": dense}
    measure(models, min(256, min(args.contexts)), args.chunk, 1, 1, 2)  # warm-up both paths
    rows = []
    for L in sorted(args.contexts):
        res = measure(models, L, args.chunk, args.prefill_repeats if L <= 16384 else 1, args.decode_rounds,
                      args.decode_steps)
        s, d = res["sparse"], res["dense"]
        row = {"context": L, "topk": topk, "sparse_prefill_s": s["prefill_s"], "dense_prefill_s": d["prefill_s"],
               "prefill_ratio": s["prefill_s"] / d["prefill_s"], "sparse_decode_ms": s["decode_ms"],
               "dense_decode_ms": d["decode_ms"], "decode_ratio": s["decode_ms"] / d["decode_ms"],
               "read_share": min(1.0, topk / L), "sparse_decode_runs": s["decode_ms_runs"],
               "dense_decode_runs": d["decode_ms_runs"], "sparse_prefill_runs": s["prefill_runs"],
               "dense_prefill_runs": d["prefill_runs"]}
        rows.append(row)
        print(f"  L={L}: prefill {row['prefill_ratio']:.2f}x, decode {row['decode_ratio']:.2f}x", flush=True)
    at16 = next((r for r in rows if r["context"] == 16384), None)
    summary = {"decode_ratio_16k": at16 and at16["decode_ratio"], "prefill_ratio_16k": at16 and at16["prefill_ratio"]}
    m = meta(threads, model=str(args.model or f"random default config {overrides or ''}".strip()),
             chunk=args.chunk, decode_steps=args.decode_steps, decode_rounds=args.decode_rounds,
             prefill_repeats=args.prefill_repeats, index_topk=topk)
    print_table(f"DSA vs dense, same weights, batch 1, {threads} threads, prefill chunk {args.chunk} (median of "
                f"{args.prefill_repeats}, 1 above 16K), decode = median of {args.decode_rounds}x{args.decode_steps} "
                "steps, modes alternating", COLUMNS, rows)
    print(f"wrote {write_result(args.name, rows, m, summary, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
