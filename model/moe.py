"""Mixture of experts: an fp32 sigmoid router with a selection-only bias, group-limited top-k, and the experts
computed grouped by expert (one matmul per expert over all its tokens, never a loop over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .config import ModelConfig
from .fp8 import expert
from .layers import MLP, linear


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.scoring = cfg.scoring_func
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Kept in fp32 whatever the model dtype (it only ranks experts).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k], router scores [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # the bias picks experts, never weighs them
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)
        ids = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale, ids, scores


class Experts(nn.Module):
    """This rank's routed experts (all of them at world size 1) as two stacked tensors: gate|up [E, 2I, H] and
    down [E, H, I]; expert `first + e` of the model is row e."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.inter = I
        self.first = parallel.shard_range(E, parallel.tp().rank, parallel.tp().world)[0]
        E = parallel.local_size(E, "n_routed_experts")
        self.expert_parallel = E < cfg.n_routed_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted sum of this rank's experts' outputs (the caller sums over ranks)."""
        N, k = ids.shape
        flat = ids.flatten()
        E = self.gate_up_proj.shape[0]
        mine = None  # expert parallel: the (token, choice) slots routed to this rank's experts
        if self.expert_parallel:
            mine = ((flat >= self.first) & (flat < self.first + E)).nonzero().squeeze(1)
            flat = flat[mine] - self.first
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        if mine is not None:
            if not order.numel():
                return torch.zeros_like(x)
            order = mine[order]
        tokens = order // k
        xs = x[tokens]
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            h = linear(xs[start : start + c], expert(self.gate_up_proj, e))
            g, u = h.split(self.inter, dim=-1)
            outs.append(linear(F.silu(g) * u, expert(self.down_proj, e)))
            start += c
        ys = torch.cat(outs) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, ys)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared, reduce=False) if shared else None
        self.last_load: torch.Tensor | None = None  # tokens per expert of the last forward (training balances it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids, _ = self.gate(x)
        if self.training:
            self.last_load = torch.bincount(ids.flatten(), minlength=self.gate.weight.shape[0])
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return parallel.all_reduce(out)  # one sum over ranks for routed and shared experts alike
