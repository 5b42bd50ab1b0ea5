"""Figures for the default model's MODEL_CARD.md: MTP acceptance per position for K = 1..3 on held-out code,
and sample chats. (Held-out loss and DSA indexer recall come from the training report, runs/train/report.json.)

    python bench/model_card.py [--model model/weights/glm-5-tiny-py] [--data runs/data] [--prompts 24]
Prints a table and writes bench/results/model_card.json.
"""

from __future__ import annotations

import argparse
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


def heldout_prompts(tok, data: Path, n: int) -> list[list[int]]:
    """Held-out chat requests (rendered up to the assistant turn) and held-out code prefixes."""
    chats, code = [], []
    for line in (data / "heldout.jsonl").open():
        doc = json.loads(line)
        if doc["kind"] == "chat" and len(chats) < n // 2:
            chats.append(tok.encode(doc["text"][: doc["prompt_chars"]]))
        elif doc["kind"] == "code" and len(code) < n - n // 2:
            code.append(tok.encode(doc["text"])[:200])
    return chats + code


def acceptance(model: Path, prompts: list[list[int]], k: int, max_tokens: int) -> dict:
    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32",
                                                num_speculative_tokens=k, kv_cache_tokens=32768, max_num_seqs=64))
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
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from model.tokenizer import Tokenizer

    prompts = heldout_prompts(Tokenizer.from_dir(args.model), args.data, args.prompts)
    rows = [acceptance(args.model, prompts, k, args.max_tokens) for k in (1, 2, 3)]
    print(f"{'K':>2} {'acceptance':>10} {'mean len':>9}  per position")
    for r in rows:
        print(f"{r['k']:>2} {r['acceptance_rate']:>10.3f} {r['mean_acceptance_length']:>9.3f}  {r['per_position']}")
    samples = chats(args.model, QUESTIONS)
    for s in samples:
        print(f"\n> {s['user']}\n{s['assistant']}")
    out = ROOT / "bench" / "results" / "model_card.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"acceptance": rows, "chats": samples, "prompts": len(prompts),
                               "max_tokens": args.max_tokens, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
