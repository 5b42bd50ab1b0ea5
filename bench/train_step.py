"""What a training step of the default model costs, and what each saving in model/train.py buys (side by side).

    python bench/train_step.py [--steps 5] [--threads 2] [--autocast off|bf16]
    [--data runs/data --tokenizer runs/tokenizer --cache runs/train/train_tokens.pt]   # `make train` builds them

One forward + backward of the dense stage (the recipe's first 70% of steps) on real batches of the corpus
(8 x 513 tokens, TrainArgs' defaults, a batch of its own per variant and step), a freshly initialised model,
several ways, alternating step by step so a drift of the machine's speed hits each alike:
- `before`: every row through the LM and MTP heads, every layer recording attention (this stop's start);
- `system turns out`: rows of system turns (the tool lists) out of the loss, so they skip the heads;
- `after`: that, and only the supervised heads' layers record attention (the rest take fused SDPA);
- `+ MTP distillation`: that, and the MTP loss's KL to the main model's prediction (`--mtp-distill`);
- `+ padded expert rows`: that, and each expert's row count rounded up in bf16 on CPU
  (`model/grouped_gemm.py:padded_counts`; oneDNN builds a kernel per row count): the default. The variants
  before it run unpadded.
The first step of each is a warm-up and is dropped; the median of the rest. Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, meta, pin_threads, print_table, write_result

from model.batch import ForwardBatch
from model.moe import Experts
from model.network import GlmMoeDsaForCausalLM
from model.tokenizer import Tokenizer
from model.train import TrainArgs, default_model_config, init_weights, loss_weights, losses, parse_heads, set_sparse
from model.train_data import TokenStream


@contextlib.contextmanager
def every_layer_collects(on: bool) -> Iterator[None]:
    """While on, `collect_layers` is ignored: every layer records its attention, as before that saving."""
    own = ForwardBatch.collecting
    if on:
        ForwardBatch.collecting = lambda self, layer: self.collect is not None
    try:
        yield
    finally:
        ForwardBatch.collecting = own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs" / "tokenizer")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "train" / "train_tokens.pt",
                    help="the tokenized corpus (written here first if missing: a few minutes)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant, after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off")
    args = ap.parse_args()
    threads = pin_threads(args.threads)
    tok = Tokenizer.from_dir(args.tokenizer)
    base = TrainArgs()
    model = GlmMoeDsaForCausalLM(default_model_config(tok))
    init_weights(model, model.config.initializer_range, base.seed)
    set_sparse(model, False)  # the dense stage
    stream = TokenStream.from_jsonl(args.data / "train.jsonl", tok, args.cache)
    heads = parse_heads(base.sup_heads)
    plain = replace(base, mtp_distill=0.0)
    variants = {"before": (replace(plain, system_weight=1.0), True, False),
                "system turns out": (plain, True, False),
                "after": (plain, False, False),
                "+ MTP distillation": (base, False, False),
                "+ padded expert rows": (base, False, None)}
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    kept: list[float] = []
    names = list(variants)
    for step in range(args.steps + 1):
        for name in names[step % len(names):] + names[: step % len(names)]:  # rotate who goes first
            # A batch of its own per variant: the same batch again would route the same row counts to the
            # experts, whose bf16 kernels the variant before had just built (oneDNN caches them by shape), and a
            # real step never sees that (its weights moved). Earlier versions of this bench had that bias.
            batch = stream.batch(base.batch, base.seq_len + 1, base.seed, step * len(names) + names.index(name))
            a, all_layers, pad = variants[name]
            for e in experts:
                e.pad_rows = pad
            weights = loss_weights(batch, tok, a)
            with every_layer_collects(all_layers), torch.autocast("cpu", torch.bfloat16,
                                                                  enabled=args.autocast == "bf16"):
                t = time.perf_counter()
                loss = losses(model, batch, "dense", a.mtp_weight, heads, a.sup_weight, weights,
                              a.mtp_distill)["total"]
                loss.backward()
                seconds[name].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
            if name == "after" and weights is not None:
                kept.append(float((weights > 0).float().mean()))
    first = statistics.median(seconds["before"][1:])
    tokens = base.batch * (base.seq_len + 1)
    rows = []
    for name, s in seconds.items():
        med = statistics.median(s[1:])
        rows.append({"variant": name, "s_per_step": med, "tok_s": tokens / med, "speedup": first / med,
                     "runs": [round(x, 3) for x in s[1:]]})
    print_table(f"Dense-stage training step, {base.batch} x {base.seq_len + 1} tokens, {threads} threads, "
                f"autocast {args.autocast}, median of {args.steps} (rows kept in the loss: "
                f"{statistics.mean(kept):.0%})",
                [("variant", "variant", ""), ("s_per_step", "s/step", ".2f"), ("tok_s", "tok/s", ".0f"),
                 ("speedup", "vs before", ".2fx")], rows)
    write_result("train_step", rows, meta(threads, autocast=args.autocast, steps=args.steps,
                                          rows_kept=statistics.mean(kept)))


if __name__ == "__main__":
    main()
