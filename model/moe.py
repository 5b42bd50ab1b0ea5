"""Mixture of experts: an fp32 sigmoid router with a selection-only bias, group-limited top-k, and the experts
computed grouped by expert (one grouped GEMM over all experts' tokens where torch has one, else one matmul per
expert; never a loop over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import grouped_gemm, parallel
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


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


class Experts(nn.Module):
    """This rank's routed experts (all of them at world size 1) as two stacked tensors: gate|up [E, 2I, H] and
    down [E, H, I]; expert `first + e` of the model is row e.

    The (token, choice) slots are sorted by expert and each expert's block is one product, through torch's
    grouped GEMM where it runs (see model/grouped_gemm.py): the per-expert ends are computed on the device, so the
    layer never waits for the device and a decode step can be captured in a CUDA graph. Elsewhere (FP8 weights,
    float64, widths whose rows are not a multiple of 16 bytes, a torch without grouped GEMM) a Python loop over
    the experts runs the same products after reading the counts back (one host sync per layer). `impl` forces
    one: "auto", "grouped" or "loop" (tests, bench/moe.py).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.inter = I
        self.first = parallel.shard_range(E, parallel.tp().rank, parallel.tp().world)[0]
        E = parallel.local_size(E, "n_routed_experts")
        self.expert_parallel = E < cfg.n_routed_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.impl = "auto"
        self.pad_rows: bool | None = None  # None: grouped_gemm.pads_rows decides (tests, benches force it)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted sum of this rank's experts' outputs (the caller sums over ranks)."""
        if not ids.numel():
            return torch.zeros_like(x)
        k = ids.shape[1]
        E = self.gate_up_proj.shape[0]
        local = ids.flatten() - self.first
        if self.expert_parallel:
            # Slots routed to other ranks' experts go to bucket E, sorted past every local expert's block: the
            # products skip them and their rows are zeroed below. No boolean selection: shapes stay fixed.
            local = torch.where((local >= 0) & (local < E), local, E)
        order = local.argsort(stable=True)
        by_expert = local[order]
        # ends[e]: slots of experts 0..e (the grouped GEMM's int32 offsets), by binary search of the sorted ids
        # rather than bincount, which reads the largest id back to the host on CUDA.
        ends = torch.searchsorted(by_expert, torch.arange(1, E + 1, device=ids.device), out_int32=True)
        tokens = order // k
        xs = x.index_select(0, tokens)
        w1, w2 = self.gate_up_proj, self.down_proj
        if self.impl != "loop" and torch.is_autocast_enabled(x.device.type) and w1.dtype in _AUTOCAST_FROM:
            # Training under autocast: the grouped products run in its dtype, as the loop's F.linear calls would.
            dtype = torch.get_autocast_dtype(x.device.type)
            xs, w1, w2 = xs.to(dtype), w1.to(dtype), w2.to(dtype)
        grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_gemm.applies(xs, w1, w2))
        pad = grouped_gemm.pads_rows(xs) if self.pad_rows is None else self.pad_rows
        if not grouped:
            ys = self._looped(xs, ends)
        elif pad and not self.expert_parallel:
            ys = self._grouped_padded(xs, by_expert, ends, w1, w2)
        else:
            ys = self._grouped(xs, ends, w1, w2)
        ys = ys.to(x.dtype) * weights.flatten()[order, None].to(x.dtype)
        if self.expert_parallel:  # rows past ends[-1] were never computed (uninitialised, maybe NaN)
            ys = torch.where((by_expert < E)[:, None], ys, 0.0)
        return torch.zeros_like(x).index_add_(0, tokens, ys)

    def _grouped(self, xs: torch.Tensor, ends: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        mm = grouped_gemm.op()
        h = mm(xs, w1.transpose(1, 2), offs=ends)
        g, u = h.split(self.inter, dim=-1)
        return mm(F.silu(g) * u, w2.transpose(1, 2), offs=ends)

    def _grouped_padded(self, xs: torch.Tensor, by_expert: torch.Tensor, ends: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor) -> torch.Tensor:
        """`_grouped` with each expert's rows padded by zero rows to a size of a small set
        (grouped_gemm.padded_counts): zero rows give zero outputs and add nothing to any gradient. Reads the padded
        total back to the host (CPU only)."""
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        padded = grouped_gemm.padded_counts(counts)
        padded_ends = padded.cumsum(0)
        total = int(padded_ends[-1])
        if total == xs.shape[0]:  # nothing rounded (a decode step's few rows per expert): no copies
            return self._grouped(xs, ends, w1, w2)
        # Slot i, the j-th of expert e's, goes to row (padded start of e) + j = i + (padded start - start of e).
        shift = (padded_ends - padded) - (ends - counts)
        rows = torch.arange(xs.shape[0], device=xs.device) + shift[by_expert]
        xp = xs.new_zeros(total, xs.shape[1]).index_copy(0, rows, xs)
        return self._grouped(xp, padded_ends.to(torch.int32), w1, w2).index_select(0, rows)

    def _looped(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """One product per expert with tokens; the counts are read back to the host (a device sync)."""
        outs, start = [], 0
        for e, end in enumerate(ends.tolist()):
            if end == start:
                continue
            h = linear(xs[start:end], expert(self.gate_up_proj, e))
            g, u = h.split(self.inter, dim=-1)
            outs.append(linear(F.silu(g) * u, expert(self.down_proj, e)))
            start = end
        if start < xs.shape[0]:  # expert parallel: other ranks' slots, zeroed by the caller
            outs.append(xs.new_zeros(xs.shape[0] - start, xs.shape[1]))
        return torch.cat(outs)


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
