"""Structured outputs: tok/s of 8 concurrent json_schema requests vs the same requests unconstrained.

    python bench/structured.py [--model DIR] [--concurrency 8] [--max-tokens 320] [--repeats 3] [--k 0 2]
                               [--threads 2]

The shipped model by default, in-process (no HTTP), greedy. The schema asks for an object holding 12 short strings,
so a constrained answer runs to ~100+ tokens and the per-token cost of the grammar (filling each row's bitmask,
masking the logits, advancing the matcher) dominates, not the one-off compile (cached after the first run). The
unconstrained run uses the same prompts, each making as many tokens as its constrained answer made (ignore_eos), so
the two loops do the same work and thin out alike as answers end (before, every free request ran to max_tokens,
and a model that closed its JSON early lost to the tail, not to the grammar). max_tokens 320 lets every answer
end: 12 strings of up to 24 characters. tok/s = output tokens / wall time of the
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


def run(engine, prompts: list[list[int]], params: list) -> tuple[float, list[int], list[str]]:
    """A closed loop: every prompt in flight at once (concurrency = len(prompts)), prompt i with params[i];
    (seconds, tokens per prompt, texts)."""
    ids = [f"r{time.perf_counter_ns()}-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params, strict=True):
        engine.add_request(rid, p, sp)
    texts = dict.fromkeys(ids, "")
    tokens = dict.fromkeys(ids, 0)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                tokens[out.request_id] += len(o.token_ids)
                texts[out.request_id] += o.text
    return time.perf_counter() - t0, [tokens[r] for r in ids], [texts[r] for r in ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=320)
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
        constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured=spec)
        n = len(prompts)
        # warm-up: xgrammar import, grammar compile, first-step allocations
        for params in (SamplingParams(temperature=0.0, max_tokens=8), SamplingParams(**{**constrained.__dict__,
                                                                                       "max_tokens": 8})):
            run(engine, prompts[:2], [params] * 2)
        kinds = ("free", "json_schema")
        speeds: dict[str, list[float]] = {name: [] for name in kinds}
        last: dict[str, tuple[int, list[str]]] = {}
        for _ in range(args.repeats):
            # The constrained answers end where their grammar does; each free request then makes exactly as many
            # tokens (ignore_eos), so both loops do the same work and thin out alike at the tail.
            seconds, counts, texts = run(engine, prompts, [constrained] * n)
            runs = {"json_schema": (seconds, counts, texts)}
            free = [SamplingParams(temperature=0.0, max_tokens=max(1, c), ignore_eos=True) for c in counts]
            runs["free"] = run(engine, prompts, free)
            for name in kinds:
                seconds, counts, texts = runs[name]
                speeds[name].append(sum(counts) / seconds)
                last[name] = (sum(counts), texts)
                print(f"  K={k} {name}: {sum(counts) / seconds:.1f} tok/s ({sum(counts)} tokens)", flush=True)
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
