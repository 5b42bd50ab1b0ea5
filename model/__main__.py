"""Smoke command: print a continuation of a prompt from a checkpoint directory.

    python -m model model/weights/<name> --prompt "def fib(n):" --max-new-tokens 64
    python -m model DIR --chat "Write a function that reverses a string."
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .generate import generate
from .loader import load_model
from .tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="raw text to continue")
    group.add_argument("--chat", help="a user message, rendered with the checkpoint's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)

    model = load_model(args.checkpoint, dtype=getattr(torch, args.dtype))
    tok = Tokenizer.from_dir(args.checkpoint)
    if args.chat is not None:
        text = tok.apply_chat_template([{"role": "user", "content": args.chat}], add_generation_prompt=True)
    else:
        text = args.prompt
    prompt = tok.encode(text)
    t0 = time.perf_counter()
    out = generate(model, prompt, args.max_new_tokens, args.temperature, top_p=args.top_p, seed=args.seed,
                   stop_ids=set(tok.eos_token_ids))
    dt = time.perf_counter() - t0
    print(tok.decode(out))
    print(f"[{len(prompt)} prompt tokens, {len(out)} new tokens, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
