"""Figures for the default model's MODEL_CARD.md, measured offline through glm-serve's engine (no server):

- tool use on the held-out tool prompts (`tool_eval.jsonl` of the corpus: whole held-out tools, and held-out
  phrasings of the training tools), tools offered, no grammar, the model free to call or not (tool_choice
  "auto"): the share whose output holds a parseable GLM-5 call to the right tool with schema-valid arguments
  (and with exactly the asked arguments); and on held-out code requests with tools offered, the share that
  calls one anyway. Thinking on (the default) and off; per held-out tool, which name its first call used
  (`heldout_tool_calls`, "wanted -> called": a training tool's name there means recall won over copying), and
  the first few outputs of each split with the tools offered;
- MTP acceptance per position for K = 1..3, greedy, on held-out chat requests, code prefixes and tool prompts;
- DSA indexer recall: the share of dense attention mass inside the indexer's top-k, on held-out code windows;
- sample chats.

    python bench/model_card.py [--model model/weights/glm-5-tiny-py] [--data runs/data] [--prompts 24]
Prints tables and writes bench/results/model_card.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import LLMEngine  # noqa: E402
from service.engine.sampling_params import SamplingParams  # noqa: E402

EXAMPLES_PER_SPLIT = 4


def heldout_prompts(tok, data: Path, n: int) -> list[list[int]]:
    """Held-out chat requests and held-out tool conversations (rendered up to the assistant turn) and held-out
    code prefixes, a third each."""
    groups: dict[str, list[list[int]]] = {"chat": [], "tool": [], "code": []}
    for line in (data / "heldout.jsonl").open():
        doc = json.loads(line)
        group = groups.get(doc["kind"])
        if group is None or len(group) >= n // 3:
            continue
        group.append(tok.encode(doc["text"])[:200] if doc["kind"] == "code" else
                     tok.encode(doc["text"][: doc["prompt_chars"]]))
    return [p for g in groups.values() for p in g]


def generate_all(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions (token ids, special tokens kept) of all prompts, batched by the engine."""
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.outputs[0].token_ids
    return [out[str(i)] for i in range(len(prompts))]


def tool_use(model: Path, data: Path, thinking: bool, max_tokens: int, limit: int | None) -> dict:
    """Tool-call accuracy per split of tool_eval.jsonl (see the module docstring), with a few raw outputs."""
    from model.tool_data import parse_tool_calls, schema_valid

    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_tokens=65536,
                                                max_num_seqs=64))
    tok = engine.tokenizer
    cases = [json.loads(line) for line in (data / "tool_eval.jsonl").open()][:limit]
    kwargs = {} if thinking else {"enable_thinking": False}
    prompts = [tok.encode(tok.apply_chat_template(c["messages"], tools=c["tools"], **kwargs)) for c in cases]
    t0 = time.perf_counter()
    outputs = generate_all(engine, prompts, max_tokens)
    splits: dict[str, dict] = {}
    examples: list[dict] = []
    confusions: collections.Counter[str] = collections.Counter()  # held-out tools: "wanted -> called" first names
    for case, ids in zip(cases, outputs, strict=True):
        text = tok.decode(ids, skip_special_tokens=False)
        calls = parse_tool_calls(text, case["tools"])
        row = splits.setdefault(case["split"], {"n": 0, "called": 0, "right_tool_valid_args": 0, "exact_args": 0})
        row["n"] += 1
        row["called"] += bool(calls)
        if case["tool"] is not None and calls:
            schema = next(t for t in case["tools"] if t["function"]["name"] == case["tool"])
            first = calls[0]
            good = first["name"] == case["tool"] and schema_valid(first["arguments"], schema)
            row["right_tool_valid_args"] += good
            row["exact_args"] += good and first["arguments"] == case["arguments"]
            if case["split"] == "heldout_tool":
                confusions[f"{case['tool']} -> {first['name']}"] += 1
        if sum(e["split"] == case["split"] for e in examples) < EXAMPLES_PER_SPLIT:
            examples.append({"split": case["split"], "user": case["messages"][0]["content"], "tool": case["tool"],
                             "offered": [t["function"]["name"] for t in case["tools"]], "output": text})
    for row in splits.values():
        for key in ("called", "right_tool_valid_args", "exact_args"):
            row[key + "_rate"] = round(row[key] / row["n"], 3)
    return {"thinking": thinking, "seconds": round(time.perf_counter() - t0, 1), "splits": splits,
            "heldout_tool_calls": dict(confusions.most_common()), "examples": examples}


def recall(model_dir: Path, data: Path, seq_len: int, rows: int) -> dict:
    """DSA indexer recall on the first `rows` x `seq_len` held-out code tokens (model.train.indexer_recall)."""
    from model.loader import load_model
    from model.tokenizer import Tokenizer
    from model.train import indexer_recall

    tok = Tokenizer.from_dir(model_dir)
    ids: list[int] = []
    for line in (data / "heldout.jsonl").open():
        doc = json.loads(line)
        if doc["kind"] == "code":
            ids += tok.encode(doc["text"])
        if len(ids) >= rows * seq_len:
            break
    tokens = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    model = load_model(model_dir, torch.float32)
    return {"recall": round(indexer_recall(model, tokens), 3), "seq_len": seq_len, "rows": rows,
            "index_topk": model.config.index_topk}


def acceptance(model: Path, prompts: list[list[int]], k: int, max_tokens: int) -> dict:
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32",
                                                num_speculative_tokens=k, speculative_policy="fixed",
                                                kv_cache_tokens=32768, max_num_seqs=64))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    s = engine.stats()
    drafts = max(1, s.spec_num_drafts)
    return {"k": k, "seconds": round(time.perf_counter() - t0, 2), "drafts": s.spec_num_drafts,
            "acceptance_rate": round(s.spec_num_accepted_tokens / max(1, s.spec_num_draft_tokens), 3),
            "mean_acceptance_length": round(1 + s.spec_num_accepted_tokens / drafts, 3),
            "per_position": [round(a / drafts, 3) for a in s.spec_accepted_per_pos]}


def chats(model: Path, questions: list[str]) -> list[dict]:
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_tokens=8192))
    tok = engine.tokenizer
    out = []
    for i, q in enumerate(questions):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=160))
        text = ""
        while engine.has_unfinished():
            for o in engine.step():
                text += "".join(c.text for c in o.outputs)
        out.append({"user": q, "assistant": text})
    return out


QUESTIONS = [
    "Write a function that returns the number of lines in a file.",
    "Return True if the string is a palindrome.",
    "Implement `merge(a, b)` that merges two sorted lists.",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "model" / "weights" / "glm-5-tiny-py")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tool-max-tokens", type=int, default=160)
    ap.add_argument("--tool-limit", type=int, default=None, help="evaluate only the first N tool prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["tools", "mtp", "recall", "chats"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from model.tokenizer import Tokenizer

    result: dict = {"model": str(args.model), "threads": args.threads}
    if "tools" not in args.skip and (args.data / "tool_eval.jsonl").is_file():
        result["tool_use"] = [tool_use(args.model, args.data, thinking, args.tool_max_tokens, args.tool_limit)
                              for thinking in (True, False)]
        print(f"{'thinking':>8} {'split':>16} {'n':>4} {'called':>7} {'right+valid':>11} {'exact':>6}")
        for run in result["tool_use"]:
            for split, row in run["splits"].items():
                print(f"{str(run['thinking']):>8} {split:>16} {row['n']:>4} {row['called_rate']:>7.1%}"
                      f" {row['right_tool_valid_args_rate']:>11.1%} {row['exact_args_rate']:>6.1%}")
    if "recall" not in args.skip:
        result["recall"] = recall(args.model, args.data, 512, 4)
        print("DSA indexer recall:", result["recall"])
    if "mtp" not in args.skip:
        prompts = heldout_prompts(Tokenizer.from_dir(args.model), args.data, args.prompts)
        rows = [acceptance(args.model, prompts, k, args.max_tokens) for k in (1, 2, 3)]
        print(f"{'K':>2} {'acceptance':>10} {'mean len':>9}  per position")
        for r in rows:
            print(f"{r['k']:>2} {r['acceptance_rate']:>10.3f} {r['mean_acceptance_length']:>9.3f}  {r['per_position']}")
        result.update(acceptance=rows, prompts=len(prompts), max_tokens=args.max_tokens)
    if "chats" not in args.skip:
        result["chats"] = chats(args.model, QUESTIONS)
        for s in result["chats"]:
            print(f"\n> {s['user']}\n{s['assistant']}")
    out = ROOT / "bench" / "results" / "model_card.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
