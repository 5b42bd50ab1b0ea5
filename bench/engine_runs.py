"""Driving the engine in-process (no HTTP): a closed loop of C concurrent greedy requests, and prompt sources
(held-out code, English prose, random ids)."""

from __future__ import annotations

import ast
import io
import json
import random
import re
import time
import tokenize
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


def closed_loop(engine, prompts: list[list[int]], max_tokens: int | list[int], concurrency: int,
                ignore_eos: bool = True, prefix: str = "r") -> EngineRun:
    """Keep `concurrency` requests in the engine; add the next prompt as soon as one finishes. `max_tokens`: one
    for all, or one per prompt."""
    from service.engine.sampling_params import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos) for n in lengths]
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
        engine.add_request(rid, p, params[i])
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


def alternate(model: Path, set_mode, batches: list[int], prompts: int, prompt_tokens: int, max_tokens: int,
              repeats: int) -> list[dict]:
    """A/B of two modes of one engine (`set_mode(engine, on)`) on `model`: per K (0, then the default: adaptive
    MTP where the checkpoint has an MTP layer) and batch B, greedy closed loops of B on held-out code prompts, the
    modes alternating (a warm-up round first); median tok/s of each ("off_tok_s", "on_tok_s"), their ratio, the
    per-repeat ratios and whether the greedy tokens are the same."""
    import statistics

    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    out = []
    for k in (0, None):
        for batch in batches:
            spec = {} if k is None else {"num_speculative_tokens": k}
            engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", dtype="float32", max_num_seqs=batch,
                                                        kv_cache_tokens=batch * 512, **spec))
            texts = prompt_set("code", model, max(prompts, 2 * batch), prompt_tokens)
            rates: dict[bool, list[float]] = {False: [], True: []}
            tokens: dict[bool, list] = {}
            for rep in range(repeats + 1):
                for on in (True, False) if rep % 2 else (False, True):
                    set_mode(engine, on)
                    run = closed_loop(engine, texts, max_tokens, batch, prefix=f"{on}{rep}-")
                    if rep:
                        rates[on].append(run.output_tokens / run.seconds)
                    tokens[on] = run.tokens
            off, on = statistics.median(rates[False]), statistics.median(rates[True])
            out.append({"k": "default" if k is None else k, "batch": batch, "off_tok_s": off, "on_tok_s": on,
                        "ratio": on / off,
                        "per_repeat": " ".join(f"{b / a:.2f}" for a, b in zip(rates[False], rates[True], strict=True)),
                        "same_tokens": tokens[False] == tokens[True]})
            set_mode(engine, True)
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, low: int = 16) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


FALLBACK_TEXT = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(description=",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "The quick brown fox jumps over the lazy dog. It is a sentence that uses every letter of the",
]


FALLBACK_PROSE = [  # plain English written for this repository; used when the held-out split is missing
    "The library opens early on weekdays, and most mornings the first visitors are students who want a quiet "
    "table before their classes begin. By noon the reading room fills up, and the staff walk between the "
    "shelves returning books that were left on desks the evening before.",
    "A good recipe tells you more than the list of ingredients. It explains why the butter should be cold, how "
    "long the dough can rest, and what the crust should look like when it is ready to come out of the oven.",
    "When the river rose after the spring rains, the farmers moved their animals to the higher fields. The water "
    "stayed for almost two weeks, and when it went down it left a layer of dark soil that made the next harvest "
    "unusually good.",
    "Learning to ride a bicycle is mostly a matter of trust. At first every wobble feels like a fall, but after a "
    "few afternoons the balance comes on its own, and the rider starts to look at the road ahead instead of the "
    "front wheel.",
    "The town council met on Thursday evening to discuss the new bus schedule. Several residents asked for an "
    "earlier service on Sundays, and the council agreed to try it for three months before making a final "
    "decision.",
    "Old maps are often wrong in interesting ways. A coastline may be drawn from a single voyage, a mountain "
    "range may be placed where a traveller heard it described, and whole islands appear that nobody has ever "
    "been able to find again.",
    "Before a long walk in the hills, it is worth checking the weather, packing a warm layer and telling someone "
    "where you plan to go. The path may look easy on the map, but the light fades quickly in the late afternoon.",
    "The orchestra rehearsed the last movement again and again. The conductor stopped them whenever the strings "
    "rushed ahead, and by the end of the evening the whole piece moved at one steady pace from the first bar to "
    "the last.",
    "Bees visit thousands of flowers in a single day. They carry pollen from one plant to the next, and in doing "
    "so they help fruit trees, vegetables and wild flowers to produce seeds for the following year.",
    "The small shop on the corner has sold newspapers for more than forty years. The owner knows most of her "
    "customers by name, remembers which paper each of them reads, and keeps a jar of sweets on the counter for "
    "the children.",
    "Writing a clear letter takes practice. The main point should come first, each paragraph should carry one "
    "idea, and the closing lines should tell the reader exactly what you hope will happen next.",
    "On clear winter nights the stars seem closer than usual. Far from the lights of the city, you can see the "
    "pale band of the galaxy stretching across the sky, and with a little patience a few shooting stars as well.",
]


def _heldout(kinds: tuple[str, ...] | None = None, min_chars: int = 0, limit: int | None = None) -> list[dict]:
    """Records of runs/data/heldout.jsonl ({"text", "kind", "source", ...}), optionally of some kinds only."""
    held = ROOT / "runs" / "data" / "heldout.jsonl"
    out: list[dict] = []
    if not held.is_file():
        return out
    with held.open() as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rec = rec if isinstance(rec, dict) else {"text": rec}
            text = rec.get("text")
            if not isinstance(text, str) or len(text) <= min_chars:
                continue
            if kinds is not None and rec.get("kind") not in kinds:
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def _windows(tokenizer_dir: Path, texts: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens, each from a text picked at random (seeded)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tok.encode(rng.choice(texts)).ids
        if len(ids) < length:
            ids = (ids * (length // max(1, len(ids)) + 1))
        start = rng.randrange(0, max(1, len(ids) - length))
        out.append(ids[start:start + length])
    return out


def text_prompts(tokenizer_dir: Path, n: int, length: int, seed: int = 0,
                 kinds: tuple[str, ...] | None = None) -> list[list[int]]:
    """Real text prompts of `length` tokens from held-out data (runs/data/heldout.jsonl when it exists; `kinds`
    keeps only records of those kinds, e.g. ("code",)), so a trained model's drafts have something to predict."""
    texts = [r["text"] for r in _heldout(kinds, min_chars=4 * length, limit=50 * n)]
    if not texts:
        texts = FALLBACK_TEXT * (1 + 4 * length // 60)
        texts = ["".join(texts)]
    return _windows(tokenizer_dir, texts, n, length, seed)


def _prose_of(source: str, min_words: int = 12) -> list[str]:
    """English paragraphs of a Python file: its docstrings (split at blank lines) and its comment blocks
    (consecutive comment lines), each joined into one line; doctests and code-like paragraphs are dropped."""
    chunks: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    chunks += re.split(r"\n\s*\n", doc)
    try:
        block: list[str] = []
        last = -2
        for t in tokenize.generate_tokens(io.StringIO(source).readline):
            if t.type != tokenize.COMMENT or not t.line.lstrip().startswith("#"):  # full-line comments only
                continue
            line = t.string.lstrip("#").strip()
            if block and t.start[0] == last + 1:
                block.append(line)
            else:
                if block:
                    chunks.append("\n".join(block))
                block = [line]
            last = t.start[0]
        if block:
            chunks.append("\n".join(block))
    except (tokenize.TokenError, SyntaxError):
        pass
    paragraphs = []
    for chunk in chunks:
        lines = [x.strip() for x in chunk.splitlines() if x.strip()]
        if not lines or any(x.startswith((">>>", "...")) for x in lines):
            continue
        text = " ".join(lines)
        if len(text.split()) < min_words:
            continue
        if sum(c.isalpha() or c.isspace() for c in text) / len(text) < 0.9:  # mostly words, not code
            continue
        paragraphs.append(text)
    return paragraphs


def prose_texts(min_chars: int = 0) -> list[str]:
    """English prose the project can ship without the hub: per held-out code file, its docstring and comment
    paragraphs joined by blank lines (the shipped model saw such text only inside code), files with over
    `min_chars` of it; FALLBACK_PROSE when the held-out split is missing or has none."""
    specials = ("[gMASK]", "<sop>", "<|endoftext|>")
    texts = []
    for rec in _heldout(("code",)):
        source = rec["text"]
        for s in specials:
            source = source.replace(s, "")
        paragraphs = _prose_of(source)
        if paragraphs and sum(len(p) for p in paragraphs) > min_chars:
            texts.append("\n\n".join(paragraphs))
    return texts or ["\n\n".join(FALLBACK_PROSE)]


def prose_prompts(tokenizer_dir: Path, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """English prose prompts of `length` tokens (prose_texts), tokenized with the model dir's tokenizer."""
    return _windows(tokenizer_dir, prose_texts(min_chars=4 * length), n, length, seed)


PROMPT_SETS = ("code", "prose")


def prompt_set(name: str, tokenizer_dir: Path, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Prompts of one named set: "code" = held-out Python files (kind "code"), "prose" = prose_prompts."""
    if name == "code":
        return text_prompts(tokenizer_dir, n, length, seed, kinds=("code",))
    if name == "prose":
        return prose_prompts(tokenizer_dir, n, length, seed)
    raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")
