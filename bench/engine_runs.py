"""Driving the engine in-process (no HTTP): a closed loop of C concurrent greedy requests, and prompt sources."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT


@dataclass
class EngineRun:
    seconds: float
    output_tokens: int
    tokens: list[list[int]]  # per prompt, in prompt order
    steps: int = 0
    first_token_s: list[float] = field(default_factory=list)  # per prompt: added -> first token


def closed_loop(engine, prompts: list[list[int]], max_tokens: int, concurrency: int, ignore_eos: bool = True,
                prefix: str = "r") -> EngineRun:
    """Keep `concurrency` requests in the engine; add the next prompt as soon as one finishes."""
    from service.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    tokens: dict[str, list[int]] = {}
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    todo = list(enumerate(prompts))[::-1]
    in_flight = 0
    steps = 0
    t0 = time.perf_counter()

    def add() -> None:
        nonlocal in_flight
        i, p = todo.pop()
        rid = f"{prefix}{i}"
        tokens[rid] = []
        added[rid] = time.perf_counter()
        engine.add_request(rid, p, params)
        in_flight += 1

    while todo and in_flight < concurrency:
        add()
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for out in outs:
            new = out.outputs[0].token_ids if out.outputs else []
            if new and out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
            tokens[out.request_id] += new
            if out.finished:
                in_flight -= 1
                if todo:
                    add()
    seconds = time.perf_counter() - t0
    order = [f"{prefix}{i}" for i in range(len(prompts))]
    return EngineRun(seconds, sum(len(tokens[r]) for r in order), [tokens[r] for r in order], steps,
                     [first.get(r, float("nan")) for r in order])


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, low: int = 16) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


FALLBACK_TEXT = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(description=",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "The quick brown fox jumps over the lazy dog. It is a sentence that uses every letter of the",
]


def text_prompts(tokenizer_dir: Path, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Real text prompts of `length` tokens from held-out data (runs/data/heldout.jsonl when it exists), so a
    trained model's drafts have something to predict."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts: list[str] = []
    held = ROOT / "runs" / "data" / "heldout.jsonl"
    if held.is_file():
        with held.open() as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = rec.get("text") if isinstance(rec, dict) else rec
                if isinstance(text, str) and len(text) > 4 * length:
                    texts.append(text)
                if len(texts) >= 50 * n:
                    break
    if not texts:
        texts = FALLBACK_TEXT * (1 + 4 * length // 60)
        texts = ["".join(texts)]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tok.encode(rng.choice(texts)).ids
        if len(ids) < length:
            ids = (ids * (length // max(1, len(ids)) + 1))
        start = rng.randrange(0, max(1, len(ids) - length))
        out.append(ids[start:start + length])
    return out
