"""Offline output tokens/s: the engine against transformers' generate() on the same checkpoint and machine.

    python bench/engine_throughput.py [--model DIR] [--concurrency 1 8 32] [--max-tokens 32] [--threads 2]

For each concurrency C, the same C prompts (mixed lengths) go through
  - engine: LLMEngine with all C requests added at once, stepped to completion (continuous batching);
  - hf-seq: transformers generate(), one request at a time;
  - hf-batch: transformers generate() on one left-padded static batch of all C prompts.
All greedy with eos off, so every run produces exactly C * max_tokens tokens. The engine's tokens are also compared
with hf-seq's (fp32 on CPU they should agree; bf16 on GPU may diverge after a near tie). Without --model a random
checkpoint of a small GLM-MoE-DSA shape is written by transformers into a temporary directory. Prints a table with
ratios and writes JSON to bench/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import LLMEngine  # noqa: E402
from service.engine.sampling_params import SamplingParams  # noqa: E402

SMALL = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    first_k_dense_replace=1, index_topk=64, index_head_dim=32, index_n_heads=8, max_position_embeddings=1024,
    initializer_range=0.1, eos_token_id=0, pad_token_id=0, bos_token_id=None,
)


def random_checkpoint(out: Path) -> Path:
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(0)
    GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**SMALL)).save_pretrained(out)
    return out


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lengths]


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids if out.outputs else []
    return time.perf_counter() - start, [tokens[str(i)] for i in range(len(prompts))]


def hf_generate(model, prompts: list[list[int]], max_tokens: int, device: str) -> list[list[int]]:
    """One generate() over a left-padded batch; returns each row's new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def timed(fn, *args) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: a random small one)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    path = args.model or random_checkpoint(Path(tmp.name))
    config = EngineConfig(model=path, device=args.device, dtype=args.dtype, max_num_seqs=max(args.concurrency),
                          max_num_batched_tokens=4096, kv_cache_tokens=max(args.concurrency) * (128 + args.max_tokens))
    engine = LLMEngine.from_config(config)
    device, dtype = engine.runner.device.type, engine.runner.dtype
    hf = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device).eval()
    vocab = engine.model_config.vocab_size

    warm = make_prompts(2, vocab, seed=99)
    run_engine(engine, warm, 4)
    hf_generate(hf, warm[:1], 4, device)

    rows = []
    for C in args.concurrency:
        prompts = make_prompts(C, vocab, seed=C)
        total = C * args.max_tokens
        t_engine, engine_tokens = run_engine(engine, prompts, args.max_tokens)
        t_seq, seq_tokens = timed(lambda ps: [hf_generate(hf, [p], args.max_tokens, device)[0] for p in ps], prompts)
        t_batch, _ = timed(hf_generate, hf, prompts, args.max_tokens, device)
        row = dict(concurrency=C, output_tokens=total, engine_tok_s=total / t_engine, hf_seq_tok_s=total / t_seq,
                   hf_batch_tok_s=total / t_batch, engine_s=t_engine, hf_seq_s=t_seq, hf_batch_s=t_batch,
                   same_tokens_as_hf_seq=sum(a == b for a, b in zip(engine_tokens, seq_tokens, strict=True)))
        row["engine_vs_hf_seq"] = row["engine_tok_s"] / row["hf_seq_tok_s"]
        row["engine_vs_hf_batch"] = row["engine_tok_s"] / row["hf_batch_tok_s"]
        rows.append(row)

    print(f"\noutput tokens/s, {device} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"{args.max_tokens} new tokens per request, prompts 16-128 tokens, model: {args.model or 'random small'}")
    print(f"{'conc':>4} {'engine':>9} {'hf-seq':>9} {'hf-batch':>9} {'eng/seq':>8} {'eng/batch':>9} {'same':>6}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['engine_tok_s']:>9.1f} {r['hf_seq_tok_s']:>9.1f} {r['hf_batch_tok_s']:>9.1f} "
              f"{r['engine_vs_hf_seq']:>7.2f}x {r['engine_vs_hf_batch']:>8.2f}x "
              f"{r['same_tokens_as_hf_seq']:>3}/{r['concurrency']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, dtype=str(dtype), threads=torch.get_num_threads(), max_tokens=args.max_tokens,
                model=str(args.model or "random small (bench/engine_throughput.py SMALL)"), torch=torch.__version__,
                machine=platform.machine(), processor=platform.processor())
    best = max(rows, key=lambda r: r["concurrency"])
    summary = {"concurrency": best["concurrency"], "engine_vs_hf_seq": best["engine_vs_hf_seq"],
               "engine_vs_hf_batch": best["engine_vs_hf_batch"]}
    args.out.write_text(json.dumps({"name": "engine_throughput", "meta": meta, "rows": rows, "summary": summary},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
