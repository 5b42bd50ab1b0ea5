"""Fine-tune only the MTP layer of a trained checkpoint, towards the main model's own predictions.

Speculative decoding gains by the share of drafts the main model accepts; greedy, a draft is accepted when the MTP
layer's argmax is the main model's. Joint training (model/train.py) gives the MTP layer 0.3 of the loss; this
continues it alone: trunk, embedding and head frozen (the main model's outputs stay bit-identical), the MTP layer
trained on KL(main model's prediction of t+2 || the draft's), DistillSpec's objective, mixed with `ce` of the
data's cross-entropy. The trunk runs as served (eval mode, DSA at its `index_topk`).

    python -m model.train_mtp --model model/weights/glm-5-tiny-py --tokens DIR --out RUN [--time-budget-s 470]
    python -m model.train_mtp --model DIR --merge RUN/mtp.safetensors --export NEW_DIR

DIR holds `train_tokens.pt` and `heldout_tokens.pt` (model/train_data.TokenStream caches). A run writes
RUN/mtp_state.pt (resumable: `--resume`), RUN/report.json (held-out agreement before and after) and
RUN/mtp.safetensors, the MTP layer's tensors alone (small enough to come back from a lent GPU); `--merge` puts
them into a copy of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .batch import ForwardBatch
from .loader import hf_state_dict, load_model
from .network import GlmMoeDsaForCausalLM
from .tokenizer import Tokenizer
from .train import add_flags, balance_experts, mtp_batch, pick_device, system_turn_weights
from .train_data import TokenStream


@dataclass
class MTPArgs:
    model: str = "model/weights/glm-5-tiny-py"
    tokens: str = "runs/train"
    out: str = "runs/mtp"
    steps: int = 4000
    batch: int = 64
    seq_len: int = 512
    lr: float = 2e-4
    warmup: int = 100
    ce: float = 0.0  # share of the data's cross-entropy in the loss (the rest: KL to the main model)
    bias_update: float = 1e-3  # the MTP layer's aux-loss-free expert balancing, as in model/train.py
    time_budget_s: float = 0.0  # > 0: after a timed probe, `steps` becomes what fits (90%) in this many seconds
    save_seconds: float = 60.0
    eval_sequences: int = 32
    device: str = "auto"
    seed: int = 0
    resume: bool = False


def mtp_prefixes(model: GlmMoeDsaForCausalLM) -> tuple[str, ...]:
    """The parameter-name prefixes of the MTP layers (the ones this trains)."""
    L = model.config.num_hidden_layers
    return tuple(f"model.layers.{L + i}." for i in range(model.config.num_mtp_layers))


def draft_rows(tokens: torch.Tensor, tok: Tokenizer) -> torch.Tensor | None:
    """[B, S-1] bool for tokens [B, S+1]: the MTP rows whose target t_{i+2} lies outside a system turn (the tool
    lists, half the corpus: a prompt, never drafted in serving; model/train.py skips them too). None: all rows
    (a tokenizer without turn markers)."""
    system = tok.token_to_id("<|system|>")
    turns = [i for i in map(tok.token_to_id, ("<|user|>", "<|assistant|>", "<|observation|>")) if i is not None]
    if system is None or not turns:
        return None
    return system_turn_weights(tokens, system, turns, 0.0)[:, 1:] > 0  # weights of t_1..t_S: from t_2


def mtp_losses(model: GlmMoeDsaForCausalLM, tokens: torch.Tensor, ce: float, rows: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """tokens [B, S+1] -> the draft's KL to the main model, its cross-entropy on the data, their mix (`total`)
    and `agree`: the share of rows whose draft argmax is the main model's (greedy acceptance at depth 1). MTP row
    i (positions 0..S-2: h_i and token i+1) predicts t_{i+2}, as the main model's row i+1 does. `rows` [B, S-1]:
    the rows that count (`draft_rows`; None: all)."""
    B, S = tokens.shape[0], tokens.shape[1] - 1
    x = tokens[:, :-1]
    keep = torch.ones(B, S - 1, dtype=torch.bool, device=x.device) if rows is None else rows
    keep = keep.reshape(-1)
    with torch.no_grad():
        h = model(x.reshape(-1), ForwardBatch(torch.arange(S, device=x.device).repeat(B), [S] * B, [S] * B))
        h = h.view(B, S, -1)
        main = model.logits(h[:, 1:].reshape(-1, h.shape[-1])[keep]).float()
    z = model.mtp(x[:, 1:].reshape(-1), h[:, :-1].reshape(-1, h.shape[-1]), mtp_batch(B, S, x.device))
    draft = model.mtp_logits(z[keep]).float()
    logq = F.log_softmax(draft, -1)
    kl = F.kl_div(logq, F.log_softmax(main, -1), log_target=True, reduction="batchmean")
    xent = F.nll_loss(logq, tokens[:, 2:].reshape(-1)[keep])
    agree = (draft.argmax(-1) == main.argmax(-1)).float().mean()
    return {"kl": kl, "ce": xent, "total": (1 - ce) * kl + ce * xent, "agree": agree}


@torch.no_grad()
def evaluate(model: GlmMoeDsaForCausalLM, tokens: torch.Tensor, tok: Tokenizer, chunk: int = 8
             ) -> dict[str, float]:
    """Held-out KL, cross-entropy and agreement over `draft_rows`, averaged over chunks of `chunk` sequences."""
    rows = [mtp_losses(model, t, 0.0, draft_rows(t, tok)) for t in tokens.split(chunk)]
    return {k: round(sum(float(r[k]) for r in rows) / len(rows), 4) for k in ("kl", "ce", "agree")}


def load_stream(cache: Path) -> TokenStream:
    """A TokenStream from the cache model/train.py writes (token ids may be int16: bench/gpu_train.sh packs them)."""
    saved = torch.load(cache)
    return TokenStream(saved["tokens"], saved["anchors"])


def lr_at(step: int, a: MTPArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    return a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup))))


def mtp_tensors(model: GlmMoeDsaForCausalLM, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The MTP layers' tensors as `checkpoint` names them, each in the dtype it has there."""
    saved = load_file(str(Path(checkpoint) / "model.safetensors"))
    return {k: v.to(saved[k].dtype).contiguous().cpu() for k, v in hf_state_dict(model, None).items()
            if k.startswith(mtp_prefixes(model))}


def train_mtp(a: MTPArgs) -> dict:
    torch.manual_seed(a.seed)
    device = pick_device(a.device)
    model = load_model(a.model, torch.float32, device).eval()
    tok = Tokenizer.from_dir(a.model)
    if not model.has_mtp:
        raise SystemExit(f"{a.model} has no MTP layer")
    layers = model.model.layers[model.config.num_hidden_layers:]
    names = {n for n, _ in model.named_parameters() if n.startswith(mtp_prefixes(model))}
    params = [p for n, p in model.named_parameters() if n in names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    tokens = Path(a.tokens)
    train_data, held = (load_stream(tokens / f"{split}_tokens.pt") for split in ("train", "heldout"))
    eval_tokens = held.sequential(a.eval_sequences, a.seq_len + 1).to(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "mtp_state.pt"
    start, log, report = 0, [], {"args": asdict(a)}
    if a.resume and state_file.exists():
        st = torch.load(state_file, weights_only=False, map_location=device)
        layers.load_state_dict(st["layers"])
        opt.load_state_dict(st["opt"])
        start, log, report, a.steps = st["step"], st["log"], st["report"], st["steps"]
        print(f"resumed at step {start}/{a.steps}", file=sys.stderr, flush=True)
    if "before" not in report:
        report["before"] = evaluate(model, eval_tokens, tok)
        print(f"held-out before: {report['before']}", file=sys.stderr, flush=True)
    autocast = device.type == "cuda"  # bf16 on a GPU; fp32 on the CPU (tests, small runs)

    def save(step: int) -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save({"layers": layers.state_dict(), "opt": opt.state_dict(), "step": step, "steps": a.steps,
                    "log": log, "report": report}, tmp)
        tmp.replace(state_file)

    t0 = last_save = time.perf_counter()
    probe = (start + 5, start + 25) if a.time_budget_s > 0 and start == 0 else None
    step = start
    while step < a.steps:
        if probe and step == probe[0]:
            t_probe = time.perf_counter()
        if probe and step == probe[1]:
            per_step = (time.perf_counter() - t_probe) / (probe[1] - probe[0])
            left = a.time_budget_s - (time.perf_counter() - t0)
            a.steps = max(step + 1, min(a.steps, step + int(0.9 * left / per_step)))
            print(f"time budget {a.time_budget_s:.0f} s: {per_step * 1000:.0f} ms a step -> {a.steps} steps",
                  file=sys.stderr, flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        layers.train()
        batch = train_data.batch(a.batch, a.seq_len + 1, a.seed, step).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            ls = mtp_losses(model, batch, a.ce, draft_rows(batch, tok))
        opt.zero_grad(set_to_none=True)
        ls["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        balance_experts(layers, a.bias_update)
        step += 1
        log.append({"step": step, **{k: round(float(v.detach()), 4) for k, v in ls.items()}})
        if step % 50 == 0 or step == a.steps:
            r = log[-1]
            print(f"[{step}/{a.steps}] kl {r['kl']:.3f} ce {r['ce']:.3f} agree {r['agree']:.3f} "
                  f"| {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if step == a.steps or time.perf_counter() - last_save >= a.save_seconds:
            save(step)
            last_save = time.perf_counter()
    layers.eval()
    report["after"] = evaluate(model, eval_tokens, tok)
    report["steps"] = a.steps
    report["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    report["device"] = str(device)
    print(f"held-out after: {report['after']}", file=sys.stderr, flush=True)
    save_file(mtp_tensors(model, a.model), str(out / "mtp.safetensors"), metadata={"format": "pt"})
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def merge(model_dir: str | Path, mtp_file: str | Path, dest: str | Path) -> list[str]:
    """A copy of `model_dir` at `dest` whose MTP tensors are `mtp_file`'s; every other tensor as it was. Returns
    the names replaced."""
    src, dest = Path(model_dir), Path(dest)
    weights = load_file(str(src / "model.safetensors"))
    new = load_file(str(mtp_file))
    missing = sorted(set(new) - set(weights))
    if missing:
        raise SystemExit(f"{mtp_file} has tensors {model_dir} lacks: {missing[:5]}")
    for k, v in new.items():
        if v.shape != weights[k].shape or v.dtype != weights[k].dtype:
            raise SystemExit(f"{k}: {tuple(v.shape)} {v.dtype} does not fit {tuple(weights[k].shape)} "
                             f"{weights[k].dtype}")
        weights[k] = v
    if dest != src:
        shutil.copytree(src, dest, dirs_exist_ok=True)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "model.safetensors").chmod(0o644)
    return sorted(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.train_mtp", description=__doc__.splitlines()[0])
    add_flags(ap, MTPArgs())
    ap.add_argument("--merge", help="an mtp.safetensors to put into --model, written to --export")
    ap.add_argument("--export", help="with --merge: the new checkpoint's directory")
    ns = vars(ap.parse_args(argv))
    mtp_file, dest = ns.pop("merge"), ns.pop("export")
    if mtp_file:
        if not dest:
            ap.error("--merge needs --export")
        print(f"replaced {len(merge(ns['model'], mtp_file, dest))} tensors; wrote {dest}", file=sys.stderr)
        return 0
    report = train_mtp(MTPArgs(**ns))
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
