"""Does the model copy what a tool call needs? A teacher-forced probe, cheap enough to run mid-training.

    python bench/tool_probe.py --state runs/train/train_state.pt     # a training checkpoint (model + optimizer)
    python bench/tool_probe.py --model DIR                           # an exported checkpoint
    [--data runs/data] [--tokenizer runs/tokenizer] [--limit N] [--dense]

For each held-out tool prompt of `tool_eval.jsonl` (model/tool_data.py: held-out tools and held-out phrasings),
the GLM-5 rendering of the request and the right call, thinking off, goes through the model once; at the
position after `<tool_call>` and after each `<arg_value>`, is the model's top token the right one (the first
token of the tool's name, of each argument's value)? Greedy generation (bench/model_card.py) needs every token
right; this shows where copying stands long before it does, and which part (names or arguments) lags. Each
prompt is also probed with its tools under fresh aliases made of random syllables, names no training document
used (split `..._aliased`): there a right name is a name copied from the tool list. The commonest wrong tokens
at the name position are listed per split: a model that guesses names from a prior (runs6 put the alias words
"onyx" and "coral" first, offered or not) shows it there.
`--dense` evaluates with dense attention (before the sparse stage the indexer is untrained). Writes
bench/results/tool_probe.json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from random import Random

import torch
from common import ROOT, meta, pin_threads, print_table, write_result

from model.batch import ForwardBatch
from model.network import GlmMoeDsaForCausalLM
from model.tokenizer import Tokenizer


def load(state: Path | None, model_dir: Path | None, tok: Tokenizer) -> tuple[GlmMoeDsaForCausalLM, int | None]:
    """The model, and the training step of a training state (None for an exported checkpoint)."""
    if model_dir is not None:
        from model.loader import load_model

        return load_model(model_dir, torch.float32), None
    from model.train import default_model_config

    saved = torch.load(state, weights_only=False, map_location="cpu")
    model = GlmMoeDsaForCausalLM(default_model_config(tok))
    model.load_state_dict(saved["model"])
    return model, saved["step"]


SYLLABLES = ["ba", "ke", "zu", "vo", "mi", "ta", "lo", "ne", "ri", "pu", "sa", "gi", "do", "fe", "hu", "ja"]


def fresh_name(rng: Random) -> str:
    """Three or four random syllables ("zuvoki"): a name no training document gave a tool, unlike the alias
    words of model/tool_data.py, which a model can learn to guess."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((3, 4))))


def aliased(record: dict, rng: Random) -> dict:
    """The record with every offered tool under a fresh name (`fresh_name`): the name can then only be copied
    from the tool list, whatever the model remembers of the real names."""
    names: dict[str, str] = {}
    for t in record["tools"]:
        while (alias := fresh_name(rng)) in names.values():
            pass
        names[t["function"]["name"]] = alias
    tools = [{**t, "function": {**t["function"], "name": names[t["function"]["name"]]}} for t in record["tools"]]
    return {**record, "tools": tools, "tool": names[record["tool"]], "split": record["split"] + "_aliased"}


def probe(model: GlmMoeDsaForCausalLM, tok: Tokenizer, record: dict) -> list[tuple[str, bool, str]]:
    """(kind, right, the model's top token) for the name position and each argument's first value token of one
    record."""
    call = {"type": "function", "function": {"name": record["tool"], "arguments": record["arguments"]}}
    messages = [*record["messages"], {"role": "assistant", "content": "", "tool_calls": [call]}]
    ids = tok.encode(tok.apply_chat_template(messages, tools=record["tools"], add_generation_prompt=False,
                                             enable_thinking=False))
    x = torch.tensor(ids)
    with torch.inference_mode():
        top = model.logits(model(x, ForwardBatch.single(len(x)))).argmax(-1)
    open_call, open_value = tok.token_to_id("<tool_call>"), tok.token_to_id("<arg_value>")
    turn = len(ids) - 1 - ids[::-1].index(tok.token_to_id("<|assistant|>"))
    first = ids.index(open_call, turn)  # the assistant's call (the system turn's instructions show a sample one)
    at = [("name", first)] + [("argument", i) for i in range(first, len(ids) - 1) if ids[i] == open_value]
    return [(kind, bool(top[i] == ids[i + 1]), tok.decode([int(top[i])])) for kind, i in at]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--state", type=Path, help="a training state (model/train.py's train_state.pt)")
    src.add_argument("--model", type=Path, help="an exported checkpoint directory")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs" / "tokenizer")
    ap.add_argument("--limit", type=int, default=0, help="at most this many records per split (0: all)")
    ap.add_argument("--dense", action="store_true", help="dense attention (the indexer not trained yet)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    pin_threads(args.threads)
    tok = Tokenizer.from_dir(args.model or args.tokenizer)
    model, step = load(args.state, args.model, tok)
    model.eval()
    if args.dense:
        from model.train import set_sparse

        set_sparse(model, False)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    seen: dict[str, int] = defaultdict(int)
    guesses: dict[str, Counter] = defaultdict(Counter)  # wrong top tokens at the name position, per split
    rng = Random(0)
    for line in (args.data / "tool_eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["tool"] is None or (args.limit and seen[record["split"]] >= args.limit):
            continue
        seen[record["split"]] += 1
        for r in (record, aliased(record, rng)):
            for kind, right, top in probe(model, tok, r):
                counts[r["split"], kind][0] += right
                counts[r["split"], kind][1] += 1
                if kind == "name" and not right:
                    guesses[r["split"]][top] += 1
    rows = [{"split": split, "position": kind, "right": r, "of": n, "accuracy": r / n,
             "wrong_names": dict(guesses[split].most_common(5)) if kind == "name" else None}
            for (split, kind), (r, n) in sorted(counts.items())]
    print_table(f"Teacher-forced first token of the call's name and of each argument (step {step})",
                [("split", "split", ""), ("position", "position", ""), ("right", "right", ""), ("of", "of", ""),
                 ("accuracy", "accuracy", ".3f")], rows)
    for split, c in sorted(guesses.items()):
        print(f"{split}: commonest wrong first tokens of the name: "
              + ", ".join(f"{t!r} x{n}" for t, n in c.most_common(5)))
    write_result("tool_probe", rows, meta(args.threads, step=step, dense=args.dense,
                                          source=str(args.state or args.model)))


if __name__ == "__main__":
    main()
