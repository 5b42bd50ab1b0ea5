"""Train the embedded default model: a small GLM-5 (MLA + DSA + MoE + MTP) on the Python stdlib corpus.

    python -m model.corpus --out runs/data
    python -m model.build_tokenizer --corpus runs/data --out runs/tokenizer
    python -m model.train --out runs/train --export runs/export --resume   # all three: `make train`

Three stages, the DeepSeek-V3.2 recipe adapted to training from scratch:
1. dense: next-token loss + MTP loss (predict t+2 from h_t and t+1; half of it, `--mtp-distill`, a KL to the
   main model's own prediction of t+2, since a draft counts when it agrees with the main model), dense
   attention, indexer idle;
2. warm-up: everything frozen but the indexer, which learns KL(attention || softmax(index scores)), dense;
3. sparse: top-k selection on; the indexer learns its KL on the selected set, the rest the LM + MTP losses.
The indexer's inputs are detached, so its loss never reaches the main model and the LM loss never reaches it.
In stages 1 and 3 some heads are also supervised (`--sup-heads`, model/attn_supervision.py): a previous-token head,
an induction head, and a pointer to where the next token already is, whose own output must name that token. A
model this small does not learn to copy from its context (argument values, tool names) on its own within the CPU
budget.
The LM loss weighs the tokens of tool calls x4 (`--call-weight`) and leaves out system turns (`--system-weight`
0: the tool lists, half the corpus, are context to read, not text to write; their rows skip the heads).
Experts are balanced without an auxiliary loss (DeepSeek-V3): the selection bias moves against the load.
Seeded, resumable (`--resume`), a progress line, CUDA when present, bf16 autocast where a timed product says
it is faster (CPUs with AMX or AVX512-BF16; on AVX2 alone bf16 is emulated and fp32 wins by ~40x).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attn_supervision import parse_heads, supervision_losses
from .batch import ForwardBatch
from .config import ModelConfig
from .indexer import Indexer
from .loader import save_checkpoint
from .moe import Experts, MoE
from .network import GlmMoeDsaForCausalLM

if TYPE_CHECKING:
    from .tokenizer import Tokenizer
from .train_data import TokenStream


def default_model_config(tok: Tokenizer) -> ModelConfig:
    """`default_config` for this tokenizer's vocabulary and special tokens."""
    return ModelConfig.from_dict(default_config(tok.vocab_size, tok.token_to_id("[gMASK]"), sorted(tok.eos_token_ids),
                                                tok.token_to_id("<|endoftext|>")), "default_config")


def default_config(vocab_size: int, bos: int, eos: list[int], pad: int | None) -> dict:
    """config.json of the shipped model: ~16M parameters, 8 layers (1 dense + 7 MoE) per MTP layer, so a draft
    costs about an eighth of a step; a one-head indexer, about 1/18 of MLA's per-key cost as in GLM-5."""
    return {
        "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 640, "moe_intermediate_size": 160,
        "num_hidden_layers": 8, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 12, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "kv_lora_rank": 64, "q_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "index_topk": 128, "index_head_dim": 32, "index_n_heads": 1, "indexer_rope_interleave": True,
        "rope_interleave": True, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
        "num_nextn_predict_layers": 1, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }


@dataclass
class TrainArgs:
    data: str = "runs/data"
    tokenizer: str = "runs/tokenizer"
    out: str = "runs/train"
    export: str | None = None
    steps: int = 2400
    batch: int = 8
    seq_len: int = 512  # the tool-use prompts are 180-430 tokens: at 256 most calls were cut off
    lr: float = 2e-3
    indexer_lr: float = 1e-3
    warmup_frac: float = 0.05  # of stage-1 steps: learning-rate warm-up
    dense_frac: float = 0.7  # stage 1 share of steps
    indexer_warmup_frac: float = 0.05  # stage 2 share
    mtp_weight: float = 0.3
    mtp_distill: float = 0.5  # share of the MTP loss that is a KL to the main model's prediction (losses())
    # Supervised attention heads (model/attn_supervision.py): kind:layer.head, and the weight of their loss.
    # Pointer and copy on the last layer, with call tokens x4, was the one recipe whose predictions began to copy
    # (first argument token right 33% at step 884 of 2,000 and rising; the pointer on layer 3: 9% at 648).
    sup_heads: str = "prev:0.0,induction:1.0,pointer:7.0,copy:7.0"
    sup_weight: float = 1.0
    call_weight: float = 4.0  # LM-loss weight of the tokens of tool calls (their names and arguments)
    system_weight: float = 0.0  # LM-loss weight of system-turn tokens (tool lists): 0 skips their heads
    bias_update: float = 1e-3  # aux-loss-free balancing step
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"  # auto (bf16 when a timed matmul says it is faster here) | bf16 | off
    save_every: int = 200
    save_minutes: float = 5.0  # also checkpoint at least this often (a session may end at any moment)
    log_every: int = 10  # a progress line every this many steps (newline-separated: the log is a file)
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    resume: bool = False
    # Re-execute the process after a checkpoint once it is this many minutes old (0: never; `main` only). A fresh
    # process runs up to 1.4x faster: glibc's heap fragments as a run ages (bench/README.md).
    restart_minutes: float = 10.0
    config_json: str | None = None  # override default_config (tests use a tiny one)
    # Fit the run to a wall-clock budget (0: off): after BUDGET_PROBE_STEPS timed steps, `steps` becomes what the
    # measured rate fits in this many minutes (with a margin: the sparse stage is slower). The report records the
    # steps chosen; `--steps N` with that N repeats the run. For a lent GPU whose minutes are counted.
    time_budget_minutes: float = 0.0
    moe_impl: str = "auto"  # routed experts: auto | grouped | loop (model/moe.py)


BUDGET_WARMUP_STEPS = 10  # not timed: CUDA and oneDNN initialise, kernels are chosen
BUDGET_PROBE_STEPS = 30
BUDGET_MARGIN = 0.85


def budget_steps(a: TrainArgs, step: int, step_seconds: float, elapsed: float) -> int:
    """The total steps that fit `a.time_budget_minutes` (measured from this process's first step), `step` steps
    being done after `elapsed` seconds and each further one taking `step_seconds`; never fewer than `step + 1`
    nor more than `a.steps`."""
    left = a.time_budget_minutes * 60 * BUDGET_MARGIN - elapsed
    return max(step + 1, min(a.steps, step + int(left / max(step_seconds, 1e-9))))


def run_config(a: TrainArgs, tok: Tokenizer) -> ModelConfig:
    """The model config of run `a`: `--config-json` when given, else `default_config` for the tokenizer."""
    if a.config_json:
        return ModelConfig.from_dict(json.loads(Path(a.config_json).read_text()), "default_config")
    return default_model_config(tok)


def stage_of(step: int, a: TrainArgs) -> str:
    s1 = int(a.steps * a.dense_frac)
    s2 = s1 + max(1, int(a.steps * a.indexer_warmup_frac))
    return "dense" if step < s1 else "warmup" if step < s2 else "sparse"


def init_weights(model: GlmMoeDsaForCausalLM, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".k_norm." in name:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            elif name.endswith("k_norm.bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


def set_sparse(model: GlmMoeDsaForCausalLM, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, Indexer):
            m.topk = model.config.index_topk if on else 1 << 30


def indexer_kl(collected: list[dict], sparse: bool) -> torch.Tensor:
    """KL(p || softmax(I)) per query, where p = attention summed over heads, L1-normalised (detached); in the
    sparse stage both are restricted to the selected keys."""
    losses = []
    for c in collected:
        if c["index"] is None:
            continue
        p = c["attn"].detach().sum(1)  # [B, Q, T]
        scores = c["index"]
        allowed = torch.isfinite(scores)
        if sparse and c["topk"] is not None:
            sel = torch.zeros_like(allowed).scatter_(2, c["topk"], True)
            allowed = allowed & sel
        p = p * allowed
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
        logq = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        kl = (p * (torch.log(p.clamp_min(1e-9)) - logq.masked_fill(~allowed, 0.0))).sum(-1)
        losses.append(kl.mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def mtp_batch(B: int, S: int, device: torch.device) -> ForwardBatch:
    """The MTP layer runs at positions 0..S-2 of each sequence (those of h_i)."""
    return ForwardBatch(torch.arange(S - 1, device=device).repeat(B), [S - 1] * B, [S - 1] * B)


def call_weights(tokens: torch.Tensor, open_id: int, close_id: int, weight: float) -> torch.Tensor:
    """[B, S] LM-loss weights of the targets tokens[:, 1:]: `weight` for a token inside a tool call, from its
    `<tool_call>` to its `</tool_call>` (both included), 1 elsewhere."""
    opened = (tokens == open_id).long().cumsum(1)
    closed_before = (tokens == close_id).long().cumsum(1) - (tokens == close_id).long()
    inside = (opened - closed_before) > 0
    return torch.where(inside[:, 1:], weight, 1.0)


def system_turn_weights(tokens: torch.Tensor, system_id: int, turn_ids: list[int], weight: float) -> torch.Tensor:
    """[B, S] LM-loss weights of the targets tokens[:, 1:]: `weight` for a token inside a system turn (from
    `<|system|>` up to the next turn's marker, any of `turn_ids`), 1 elsewhere. Half the corpus's characters
    are the tool lists of system turns, the same 44 schemas over and over: at weight 0 their rows skip the LM
    and MTP heads (1.13x per step, bench/train_step.py), and the loss is spent on what the model has to write."""
    S = tokens.shape[1]
    marker = tokens == system_id
    for t in turn_ids:
        marker |= tokens == t
    pos = torch.arange(S, device=tokens.device).expand_as(tokens)
    last = torch.where(marker, pos, -1).cummax(1).values  # the latest turn marker at or before each position
    in_system = (last >= 0) & (tokens.gather(1, last.clamp(min=0)) == system_id)
    return torch.where(in_system[:, 1:], weight, 1.0)


def loss_weights(tokens: torch.Tensor, tok: Tokenizer, a: TrainArgs) -> torch.Tensor | None:
    """The LM-loss weights of a batch's targets from `call_weight` and `system_weight` (None: all 1); a
    tokenizer without the tags they need (a test's) gets neither."""
    weights = None
    call_tags = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    if a.call_weight != 1.0 and None not in call_tags:
        weights = call_weights(tokens, *call_tags, a.call_weight)
    system = tok.token_to_id("<|system|>")
    turns = [i for i in map(tok.token_to_id, ("<|user|>", "<|assistant|>", "<|observation|>")) if i is not None]
    if a.system_weight != 1.0 and system is not None and turns:
        sw = system_turn_weights(tokens, system, turns, a.system_weight)
        weights = sw if weights is None else weights * sw
    return weights


def losses(model: GlmMoeDsaForCausalLM, tokens: torch.Tensor, stage: str, mtp_weight: float,
           heads: dict[str, tuple[int, int]] | None = None, sup_weight: float = 0.0,
           weights: torch.Tensor | None = None, mtp_distill: float = 0.0) -> dict[str, torch.Tensor]:
    """tokens [B, S+1] -> LM, MTP, indexer-KL and head-supervision losses for one batch. The MTP loss is the
    cross-entropy on t_{i+2}, mixed (`mtp_distill`) with a KL towards the main model's own prediction of
    t_{i+2}: a draft is accepted when it agrees with the main model, not with the data (DistillSpec)."""
    B, S1 = tokens.shape
    S = S1 - 1
    x, y = tokens[:, :-1], tokens[:, 1:]
    fb = ForwardBatch(torch.arange(S, device=tokens.device).repeat(B), [S] * B, [S] * B)
    supervise = bool(heads) and sup_weight > 0 and stage != "warmup"
    fb.collect = [] if stage != "dense" or supervise else None
    if stage == "dense" and supervise:  # only the supervised heads' layers: the rest keep fused attention
        fb.collect_layers = frozenset(layer for layer, _ in heads.values())
    h = model(x.reshape(-1), fb)  # [B*S, H]
    # A weighted mean (tool calls count more, system turns not at all: `loss_weights`); rows of weight 0 skip
    # the head. `kept` maps each row to its row of `logits` (-1: skipped).
    w = torch.ones(B * S, device=tokens.device) if weights is None else weights.reshape(-1)
    keep = w > 0
    kept = torch.cumsum(keep.long(), 0) - 1
    logits = model.logits(h[keep])
    lm = (F.cross_entropy(logits, y.reshape(-1)[keep], reduction="none") * w[keep]).sum() / w.sum().clamp(min=1e-6)
    out = {"lm": lm, "kl": indexer_kl(fb.collect or [], stage == "sparse") if stage != "dense"
           else torch.zeros((), device=tokens.device)}
    sup = supervision_losses(fb.collect, x, y, heads, model) if supervise else {}
    if model.has_mtp:
        hh = h.view(B, S, -1)[:, :-1].reshape(-1, h.shape[-1])  # h_i for i < S-1
        z = model.mtp(x[:, 1:].reshape(-1), hh, mtp_batch(B, S, tokens.device))
        z = z.view(B, S - 1, -1)[:, :-1].reshape(-1, z.shape[-1])  # predicts t_{i+2}; needs i+2 <= S
        # MTP row i predicts t_{i+2}, the main model's row i+1 too: it counts when that row does (unweighted)
        rows = keep.view(B, S)[:, 1:-1].reshape(-1)
        mtp_logits = model.mtp_logits(z[rows])
        out["mtp"] = F.cross_entropy(mtp_logits, tokens[:, 2:S].reshape(-1)[rows])
        if mtp_distill > 0:  # KL(main model's next-token distribution || the draft's), the main side detached
            main = logits[kept.view(B, S)[:, 1:-1].reshape(-1)[rows]].detach().float()
            out["mtp_kl"] = F.kl_div(F.log_softmax(mtp_logits.float(), -1), F.log_softmax(main, -1),
                                     log_target=True, reduction="batchmean")
    else:
        out["mtp"] = torch.zeros((), device=tokens.device)
    mtp = out["mtp"] if mtp_distill == 0 else (1 - mtp_distill) * out["mtp"] + mtp_distill * out["mtp_kl"]
    out["total"] = (lm + mtp_weight * mtp) if stage != "warmup" else out["kl"]
    if stage == "sparse":
        out["total"] = out["total"] + out["kl"]
    for kind, loss in sup.items():
        out[kind] = loss
        out["total"] = out["total"] + sup_weight * loss
    return out


@torch.no_grad()
def indexer_recall(model: GlmMoeDsaForCausalLM, tokens: torch.Tensor) -> float:
    """Share of the dense attention mass (summed over heads) inside the indexer's top-k, averaged over the
    queries that have more than index_topk keys."""
    B, S = tokens.shape
    k = model.config.index_topk
    set_sparse(model, False)
    fb = ForwardBatch(torch.arange(S, device=tokens.device).repeat(B), [S] * B, [S] * B)
    fb.collect = []
    model(tokens.reshape(-1), fb)
    recalls = []
    for c in fb.collect:
        if c["index"] is None:
            continue
        p = c["attn"].sum(1)
        p = p / p.sum(-1, keepdim=True)
        top = c["index"].topk(k, dim=-1).indices
        recalls.append(p.gather(2, top).sum(-1)[:, k:].mean())
    return float(torch.stack(recalls).mean())


def balance_experts(model: nn.Module, step_size: float) -> None:
    for m in model.modules():
        if isinstance(m, MoE) and m.last_load is not None:
            load = m.last_load.float()
            m.gate.e_score_correction_bias += step_size * torch.sign(load.mean() - load)


def lr_at(step: int, a: TrainArgs) -> float:
    warm = max(1, int(a.steps * a.dense_frac * a.warmup_frac))
    if step < warm:
        return a.lr * (step + 1) / warm
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_is_faster(device: torch.device, n: int = 512) -> bool:
    """Whether a bf16 matmul beats fp32 here, timed. CPUs with AMX or AVX512-BF16 run it several times faster;
    on AVX2 alone it is emulated, ~40x slower than fp32 (measured on a 2-core EPYC), so a fixed rule cannot say."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        times = []
        for _ in range(4):  # the first warms the kernels up and is dropped
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(torch.bfloat16) < 0.8 * best(torch.float32)


def train(a: TrainArgs, after_save: Callable[[int], None] | None = None) -> dict:
    """The run `a` describes (continued from its checkpoint with `resume`); `after_save(step)` is called after
    each checkpoint (`main` uses it to re-execute an aged process)."""
    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_dir(a.tokenizer)
    cfg = run_config(a, tok)
    model = GlmMoeDsaForCausalLM(cfg).to(device)
    init_weights(model, cfg.initializer_range, a.seed)
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = a.moe_impl
    train_data = TokenStream.from_jsonl(Path(a.data) / "train.jsonl", tok, out / "train_tokens.pt")
    held = TokenStream.from_jsonl(Path(a.data) / "heldout.jsonl", tok, out / "heldout_tokens.pt")

    heads = parse_heads(a.sup_heads)
    indexer_params = [p for n, p in model.named_parameters() if ".indexer." in n]
    main_params = [p for n, p in model.named_parameters() if ".indexer." not in n]
    opt = torch.optim.AdamW([{"params": main_params, "lr": a.lr, "weight_decay": 0.1},
                             {"params": indexer_params, "lr": a.indexer_lr, "weight_decay": 0.0}],
                            betas=(0.9, 0.95))
    state_file = out / "train_state.pt"
    start, log, report, seconds_before, saved_bf16 = 0, [], {}, 0.0, None
    if a.resume and state_file.exists():
        st = torch.load(state_file, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, log, report = st["step"], st["log"], st["report"]
        seconds_before = st.get("seconds", 0.0)
        saved_bf16 = st.get("bf16")
        print(f"resumed at step {start}/{a.steps} ({seconds_before / 60:.1f} min trained before)",
              file=sys.stderr, flush=True)

    def save(step: int) -> None:
        tmp = state_file.with_suffix(".tmp")  # write then rename: a kill mid-save keeps the last good state
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                    "report": report, "seconds": seconds_before + time.perf_counter() - t0, "bf16": use_bf16}, tmp)
        tmp.replace(state_file)

    # A resumed run keeps the precision it started with: the timing that chose it could come out otherwise.
    use_bf16 = a.autocast == "bf16" or (a.autocast == "auto" and (
        saved_bf16 if saved_bf16 is not None else bf16_is_faster(device)))
    print(f"autocast: {'bf16' if use_bf16 else 'off'} ({a.autocast})", file=sys.stderr, flush=True)
    eval_tokens = held.sequential(8, a.seq_len).to(device)
    if "recall_initial" not in report:
        report["recall_initial"] = indexer_recall(model, eval_tokens[:4])
    t0, tokens_seen = time.perf_counter(), 0
    last_save = t0
    probe_from = start + BUDGET_WARMUP_STEPS
    budget = a.time_budget_minutes > 0 and "budget_steps" not in report
    if "budget_steps" in report:  # resumed: the steps the budget chose keep the stages where they were
        a.steps = report["budget_steps"]
    for step in itertools.count(start):
        if step >= a.steps:  # a.steps may shrink to the time budget on the way
            break
        if budget and step == probe_from:
            probe_t0 = time.perf_counter()
        if budget and step == probe_from + BUDGET_PROBE_STEPS:
            per_step = (time.perf_counter() - probe_t0) / BUDGET_PROBE_STEPS
            a.steps = budget_steps(a, step, per_step, time.perf_counter() - t0)
            report["budget_steps"] = a.steps
            print(f"time budget {a.time_budget_minutes} min: {per_step * 1000:.0f} ms a step -> {a.steps} steps",
                  file=sys.stderr, flush=True)
        stage = stage_of(step, a)
        if stage == "sparse" and "recall_after_warmup" not in report:
            report["recall_after_warmup"] = indexer_recall(model, eval_tokens[:4])
        set_sparse(model, stage == "sparse")
        for p in main_params:
            p.requires_grad_(stage != "warmup")
        for p in indexer_params:
            p.requires_grad_(stage != "dense")
        frac = lr_at(step, a) / a.lr
        opt.param_groups[0]["lr"] = a.lr * frac
        opt.param_groups[1]["lr"] = a.indexer_lr * (1.0 if stage == "warmup" else frac)
        model.train()
        batch = train_data.batch(a.batch, a.seq_len + 1, a.seed, step).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            weights = loss_weights(batch, tok, a)
            ls = losses(model, batch, stage, a.mtp_weight, heads, a.sup_weight, weights, a.mtp_distill)
        opt.zero_grad(set_to_none=True)
        ls["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if stage != "warmup":
            balance_experts(model, a.bias_update)
        tokens_seen += batch.numel()
        row = {"step": step + 1, "stage": stage, **{k: round(float(v.detach()), 4) for k, v in ls.items()}}
        log.append(row)
        rate = tokens_seen / (time.perf_counter() - t0)
        eta = (a.steps - step - 1) * a.batch * (a.seq_len + 1) / rate
        if (step + 1) % a.log_every == 0 or step == start or step + 1 == a.steps:
            sup_text = "".join(f" {k} {row[k]:.2f}" for k in heads if k in row)
            distill = f" mtp_kl {row['mtp_kl']:.3f}" if "mtp_kl" in row else ""
            print(f"[{step + 1}/{a.steps}] {stage:6s} lm {row['lm']:.3f} mtp {row['mtp']:.3f}{distill}"
                  f" kl {row['kl']:.3f}{sup_text} | {rate:.0f} tok/s | eta {eta / 60:.1f} min"
                  f" | {time.strftime('%H:%M:%S')}",
                  file=sys.stderr, flush=True)
        now = time.perf_counter()
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps or now - last_save >= a.save_minutes * 60:
            save(step + 1)
            last_save = now
            if after_save is not None and step + 1 < a.steps:
                after_save(step + 1)
    model.eval()
    report["recall_final"] = indexer_recall(model, eval_tokens[:4])
    report["heldout"] = evaluate_loss(model, eval_tokens)
    report["train_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    report["train_seconds_total"] = round(seconds_before + time.perf_counter() - t0, 1)
    report["args"] = asdict(a)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["device"] = str(device)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if a.export:
        export(model, a.tokenizer, a.export)
    return report


@torch.no_grad()
def evaluate_loss(model: GlmMoeDsaForCausalLM, tokens: torch.Tensor) -> dict[str, float]:
    set_sparse(model, True)
    ls = losses(model, tokens, "dense", 0.0)
    return {"lm_loss": round(float(ls["lm"]), 4), "mtp_loss": round(float(ls["mtp"]), 4),
            "lm_ppl": round(math.exp(float(ls["lm"])), 2)}


def export(model: GlmMoeDsaForCausalLM, tokenizer_dir: str | Path, dest: str | Path) -> None:
    """Hugging Face layout: bf16 safetensors, config, tokenizer files, generation config."""
    dest = Path(dest)
    save_checkpoint(model, dest, dtype=torch.bfloat16)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != "generation_config.json":
            shutil.copy(f, dest / f.name)
    cfg = model.config
    gen = {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
           "temperature": 0.7, "top_p": 0.95, "do_sample": True}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def export_state(a: TrainArgs) -> int:
    """Export the model of `a.out`'s last checkpoint to `a.export` (a run cut short, e.g. at a lent GPU's
    deadline); returns the checkpoint's step."""
    from .tokenizer import Tokenizer

    st = torch.load(Path(a.out) / "train_state.pt", weights_only=False, map_location="cpu")
    tok = Tokenizer.from_dir(a.tokenizer)
    cfg = run_config(a, tok)
    model = GlmMoeDsaForCausalLM(cfg)
    model.load_state_dict(st["model"])
    export(model, a.tokenizer, a.export)
    return st["step"]


def restart(argv: list[str], step: int) -> None:
    """Replace this process by `python -m model.train ARGV --resume`, which continues from the checkpoint just
    written (same pid, environment and log file)."""
    print(f"restarting at the step-{step} checkpoint: a fresh process trains faster", file=sys.stderr, flush=True)
    sys.stdout.flush()
    args = argv if "--resume" in argv else [*argv, "--resume"]
    os.execv(sys.executable, [sys.executable, "-m", "model.train", *args])


def add_flags(ap: argparse.ArgumentParser, args: object) -> None:
    """One flag per field of the dataclass instance `args` (`--steps N`; booleans as switches)."""
    for name, default in asdict(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(flag, action="store_true")
        else:
            kind = type(default) if default is not None else str
            ap.add_argument(flag, type=kind, default=default)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    add_flags(ap, TrainArgs())
    ap.add_argument("--export-only", action="store_true", help="export --out's last checkpoint to --export")
    ns = vars(ap.parse_args(argv))
    if ns.pop("export_only"):
        args = TrainArgs(**ns)
        if not args.export:
            ap.error("--export-only needs --export")
        print(f"exported the step-{export_state(args)} checkpoint to {args.export}", file=sys.stderr)
        return 0
    args = TrainArgs(**ns)
    started = time.monotonic()

    def restart_if_aged(step: int) -> None:
        if args.restart_minutes > 0 and time.monotonic() - started >= args.restart_minutes * 60:
            restart(list(sys.argv[1:] if argv is None else argv), step)

    report = train(args, after_save=restart_if_aged)
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
