"""Supervised attention heads: an auxiliary training loss that builds the copying circuit early.

A model this small, trained from scratch on a few million tokens, does not learn to copy a token from its
context on its own: induction heads form after some 25-30M tokens at our batch shapes (Aoyama et al., 2025), and
the 3-hour CPU budget is 5-8M. Copying is what tool calls need (argument values from the request, a tool's name
from the tool list, the answer from the observation), so three heads are told where to look:

- `prev`: attend to the previous token (the first half of an induction circuit);
- `induction`: at token x_q, attend to j+1 for every earlier j with x_j == x_q (what followed it last time);
- `pointer`: attend to every earlier position holding the token about to be predicted, x_{q+1}, when that token
  occurs there at most `POINTER_MAX_HITS` times (a rare token: an argument, a name; not a space).

Each loss is -log(attention mass on the target keys), averaged over the queries that have a target. Looking is
not enough. In one run the pointer head put 0.6 of its attention on the right argument, and its output, read
through the LM head, never named that token. So one more loss,
`copy`, reads a head's own output (through its slice of o_proj, the final norm and the LM head) and asks it to
predict the token it points at, on the pointer's queries. The heads are ordinary heads at inference; the
checkpoint does not change shape.
"""

from __future__ import annotations

import torch

POINTER_MAX_HITS = 4
KINDS = ("prev", "induction", "pointer", "copy")


def parse_heads(spec: str) -> dict[str, tuple[int, int]]:
    """"prev:0.0,induction:1.0,pointer:3.0,copy:3.0" -> {kind: (layer, head)}; "" -> {}."""
    heads: dict[str, tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, where = part.partition(":")
        layer, _, head = where.partition(".")
        if kind not in KINDS or not layer.isdigit() or not head.isdigit():
            raise ValueError(f"bad head spec {part!r}: want kind:layer.head with kind in {KINDS}")
        heads[kind] = (int(layer), int(head))
    return heads


def targets(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, S, S] bool: for query q (dim 1), the keys j (dim 2) the head should attend to. x: inputs [B, S],
    y: next tokens [B, S] (y[:, q] == x[:, q + 1])."""
    S = x.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    if kind == "prev":
        return torch.eye(S, dtype=torch.bool, device=x.device).roll(-1, dims=1).tril().expand(x.shape[0], S, S)
    if kind == "induction":
        same = (x[:, :, None] == x[:, None, :]) & causal.tril(-1)  # j < q with x_j == x_q
        shifted = torch.zeros_like(same)
        shifted[:, :, 1:] = same[:, :, :-1]  # key j + 1 <= q
        return shifted
    if kind in ("pointer", "copy"):
        hits = (y[:, :, None] == x[:, None, :]) & causal  # j <= q with x_j == y_q
        n = hits.sum(-1, keepdim=True)
        return hits & (n <= POINTER_MAX_HITS)
    raise ValueError(kind)


def head_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """probs [B, S, T] (one head), target [B, S, S] bool -> mean over queries with a target of
    -log(mass on the target keys); zero when no query has one."""
    T = probs.shape[-1]
    mass = (probs.float() * target[..., :T]).sum(-1)
    has = target.any(-1)
    if not bool(has.any()):
        return probs.sum() * 0.0
    return -torch.log(mass[has].clamp_min(1e-6)).mean()


def copy_loss(model: torch.nn.Module, out: torch.Tensor, layer: int, head: int, y: torch.Tensor,
              target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token y from one head's output alone, on the queries with a target. out: the
    layer's per-head attention outputs [B*S, nh, v_dim] (before o_proj)."""
    o_proj = model.model.layers[layer].self_attn.o_proj.weight  # [hidden, nh * v_dim]
    v = out.shape[-1]
    has = target.any(-1).reshape(-1)
    if not bool(has.any()):
        return out.sum() * 0.0
    part = torch.nn.functional.linear(out[has, head], o_proj[:, head * v:(head + 1) * v])  # [n, hidden]
    logits = model.logits(model.model.norm(part))
    return torch.nn.functional.cross_entropy(logits, y.reshape(-1)[has])


def supervision_losses(collected: list[dict], x: torch.Tensor, y: torch.Tensor,
                       heads: dict[str, tuple[int, int]], model: torch.nn.Module | None = None
                       ) -> dict[str, torch.Tensor]:
    """{kind: loss} for each supervised head whose layer's attention was collected (fb.collect entries);
    `copy` needs the model (its o_proj, final norm and LM head)."""
    by_layer = {c["layer"]: c for c in collected}  # attn: [B, nh, Q, T]; out: [B*Q, nh, v_dim]
    masks: dict[str, torch.Tensor] = {}  # pointer and copy share one target mask: build it once

    def target(kind: str) -> torch.Tensor:
        key = "pointer" if kind == "copy" else kind
        if key not in masks:
            masks[key] = targets(x, y, key)
        return masks[key]

    losses = {}
    for kind, (layer, head) in heads.items():
        if layer not in by_layer:
            continue
        if kind == "copy":
            if model is not None:
                losses[kind] = copy_loss(model, by_layer[layer]["out"], layer, head, y, target(kind))
        else:
            losses[kind] = head_loss(by_layer[layer]["attn"][:, head], target(kind))
    return losses
