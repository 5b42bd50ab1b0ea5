"""Structured outputs: tok/s of 8 concurrent json_schema requests vs the same requests unconstrained.

    python bench/structured.py [--model DIR] [--concurrency 8] [--max-tokens 160] [--repeats 3] [--k 0 2]
                               [--threads 2]

The shipped model by default, in-process (no HTTP), greedy. The schema asks for an object holding 12 short strings,
so a constrained answer runs to ~100+ tokens and the per-token cost of the grammar (filling each row's bitmask,
masking the logits, advancing the matcher) dominates, not the one-off compile (cached after the first run). The
unconstrained run uses the same prompts and max_tokens with ignore_eos. tok/s = output tokens / wall time of the
closed loop; the median over `repeats`, the two kinds interleaved. With `--k 2` the same pair runs with fixed K MTP
speculative decoding, where constrained rows draft nothing (so the ratio there also shows what drafting buys the
free rows). Target (issue 15): constrained >= 0.85x unconstrained at K = 0. Writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import checkpoints
from common import DEFAULT_THREADS, meta, pin_threads, print_table, warn_if_busy, write_result

COLUMNS = [("k", "K", "d"), ("kind", "kind", ""), ("tok_s", "tok/s", ".1f"), ("ratio", "vs free", ".2fx"),
           ("tokens", "tokens", "d"), ("valid", "valid JSON", "")]
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 12, "maxItems": 12,
                                                     "items": {"type": "string", "maxLength": 24}}},
          "required": ["items"], "additionalProperties": False}


def run(engine, prompts: list[list[int]], params) -> tuple[float, int, list[str]]:
    """A closed loop: every prompt in flight at once (concurrency = len(prompts)); (seconds, tokens, texts)."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", p, params)
    texts: dict[str, str] = {}
    tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                tokens += len(o.token_ids)
                texts[out.request_id] = texts.get(out.request_id, "") + o.text
    return time.perf_counter() - t0, tokens, list(texts.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args(argv)
    threads = pin_threads(args.threads)
    warn_if_busy()

    from service.api import structured
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine
    from service.engine.sampling_params import SamplingParams

    model = checkpoints.model_or_shipped(args.model)
    fmt, _ = structured.response_format_spec({"type": "json_schema", "json_schema": {"name": "list",
                                                                                      "schema": SCHEMA}}, None)
    spec = structured.build_spec(fmt, reasoning=False)
    rows = []
    for k in args.k:
        engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=args.concurrency,
                                                    kv_cache_tokens=args.concurrency * 1024, max_model_len=1024,
                                                    num_speculative_tokens=k, speculative_policy="fixed"))
        tok = engine.tokenizer
        asks = ["Name twelve Python modules.", "List twelve files.", "Twelve colours, please.", "Twelve words."]
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": asks[i % len(asks)] + " " * i}]))
                   for i in range(args.concurrency)]
        kinds = {"free": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
                 "json_schema": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured=spec)}
        for params in kinds.values():  # warm-up: xgrammar import, grammar compile, first-step allocations
            run(engine, prompts[:2], SamplingParams(**{**params.__dict__, "max_tokens": 8}))
        speeds: dict[str, list[float]] = {name: [] for name in kinds}
        last: dict[str, tuple[int, list[str]]] = {}
        for _ in range(args.repeats):
            for name, params in kinds.items():
                seconds, tokens, texts = run(engine, prompts, params)
                speeds[name].append(tokens / seconds)
                last[name] = (tokens, texts)
                print(f"  K={k} {name}: {tokens / seconds:.1f} tok/s ({tokens} tokens)", flush=True)
        free = statistics.median(speeds["free"])
        for name in kinds:
            tokens, texts = last[name]
            valid = ""
            if name == "json_schema":
                ok = 0
                for t in texts:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        ok += len(json.loads(t)["items"]) == 12
                valid = f"{ok}/{len(texts)}"
            rows.append({"k": k, "kind": name, "tok_s": statistics.median(speeds[name]), "tok_s_runs": speeds[name],
                         "ratio": statistics.median(speeds[name]) / free, "tokens": tokens, "valid": valid})
    print_table("structured outputs: json_schema vs free, 8 concurrent", COLUMNS, rows)
    summary = {f"ratio_k{r['k']}": r["ratio"] for r in rows if r["kind"] == "json_schema"}
    write_result("structured", rows, meta(threads, concurrency=args.concurrency, max_tokens=args.max_tokens,
                                          model=str(model)), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
