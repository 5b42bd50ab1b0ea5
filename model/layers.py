"""Small building blocks: RMSNorm, rotary embedding, SwiGLU MLP and the linear wrappers.

The linear wrappers name the dimension a tensor-parallel shard would split (nano-vllm / vLLM shape). With one
rank they are plain `nn.Linear`; sharding can be added here without touching the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColumnParallelLinear(nn.Linear):
    """Output features would be split across ranks (q/kv up-projections, gate/up)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)


class RowParallelLinear(nn.Linear):
    """Input features would be split across ranks, outputs all-reduced (o_proj, down)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)


class ReplicatedLinear(nn.Linear):
    """Kept whole on every rank (low-rank down-projections, router, indexer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    """Normalises in float32, casts back, then scales: the transformers order (matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). Dense layers and the shared expert."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter)
        self.up_proj = ColumnParallelLinear(hidden, inter)
        self.down_proj = RowParallelLinear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """Default RoPE. `interleave` rotates pairs (2i, 2i+1) (GPT-J; GLM-5 MLA and indexer); otherwise (i, i+d/2)
    (NeoX; DeepSeek-V3.2's indexer). Interleaved outputs come back de-interleaved, as in transformers: a fixed
    permutation applied to both q and k, so dot products are unchanged.
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()  # [N, dim/2]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
        """x: [N, ..., dim]; cos/sin: [N, dim/2]."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
        if interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
