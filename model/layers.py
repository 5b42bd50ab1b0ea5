"""Small building blocks: RMSNorm, rotary embedding, SwiGLU MLP and the linear wrappers.

The linear wrappers name the dimension a tensor-parallel rank splits (nano-vllm / vLLM shape; see model/parallel.py):
built under a world size of N they hold 1/N of the weight. With one rank they are plain `nn.Linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, parallel

# On some CPUs the BLAS reads a weight far faster as the left operand of a GEMM with a few columns than through
# its GEMV/skinny-GEMM path for x @ W^T: on a 2-core AMD EPYC (MKL), 8192x256 fp32 cold, 1 row 1.04 ms as x @ W^T
# vs 0.45 ms as W @ [x; x]^T, 3 rows 1.87 vs 0.61 ms. On an Intel Xeon (AVX-512, AMX) it is the reverse: F.linear
# is 2-5x faster for every decode shape of the shipped model (640x256 at 2 rows: 15 vs 77 us). So the CPU decides:
# `skinny_wx_pays` times both once per process. Decode batches are exactly these shapes.
SMALL_BATCH_ROWS = 8
TALL_ROWS = 4096  # weights with this many output features or more (the LM head) are timed apart


@functools.cache
def skinny_wx_pays(dtype: torch.dtype, tall: bool) -> bool:
    """Whether W @ x^T beats F.linear for a few rows on this CPU (one row, padded to two, for a `tall` weight),
    timed once on a weight of the shipped model's shape: best of 5 interleaved rounds, 10% margin."""
    import time

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8192 if tall else 640, 256, generator=g).to(dtype)
    x = torch.randn(1 if tall else 4, 256, generator=g).to(dtype)
    xx = x.expand(2, -1).contiguous() if tall else x
    calls = 3 if tall else 20
    best = {"linear": float("inf"), "wx": float("inf")}
    for _ in range(5):
        for name, fn in (("linear", lambda: F.linear(x, w)), ("wx", lambda: torch.mm(w, xx.t()).t().contiguous())):
            fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["wx"] < 0.9 * best["linear"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pad_single: bool = False
           ) -> torch.Tensor:
    """F.linear, computed as (W @ x^T)^T for 2..SMALL_BATCH_ROWS rows on a CPU where that pays
    (`skinny_wx_pays`). `pad_single` also sends one row that way (duplicated to two), for very tall weights
    such as the LM head. A weight stored transposed (model/cpu_layout.py) always takes F.linear: that is the
    layout it was stored for."""
    if weight.dtype == fp8.FP8:  # a kept FP8 weight: block-scaled matmul, else dequantized for this product
        y = fp8.fp8_linear(x, weight, bias)
        if y is not None:
            return y
        weight = fp8.dequantize_weight(weight, x.dtype)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (x.device.type != "cpu" or weight.stride(-2) == 1 or rows > SMALL_BATCH_ROWS or rows == 0
            or (rows == 1 and not pad_single)
            or not skinny_wx_pays(x.dtype, rows == 1 or weight.shape[0] >= TALL_ROWS)):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    y = torch.mm(weight, flat.t())[:, :rows].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


# MKL also repacks the weight of every small-M GEMM it runs; for a tall weight such as the 8192x256 LM head that
# copy costs more than the product. oneDNN with the weight reordered once skips it: measured 1 thread, hot,
# 16 rows 1.77 -> 0.65 ms, 4 rows 0.61 -> 0.19 ms (Xeon). From one row up: on a 2-core AMD EPYC, MKL's cost grows
# with every row (1 / 2 / 3 rows 113 / 203 / 304 us hot) where oneDNN's stays flat (93 / 94 / 96 us), so an MTP
# verify step's 2-3 rows per sequence and the draft head gain most (bench/README.md, "The LM head from one row");
# on the Xeon below 8 rows it was level. Small weights stay on F.linear (oneDNN adds ~8-12 us a call).
PACK_MIN_ELEMENTS = 1 << 19  # an 8192 x 64 head: 16 rows 182 -> 79 us, 64 rows 598 -> 260 us (EPYC); 1 row level
PACK_BATCH_HINT = 16  # the M oneDNN tunes the layout for; any M >= 8 measured the same


# BF16_PACK_NOTE: in bfloat16 on a CPU with bf16 units (AVX512-BF16 / AMX) F.linear runs oneDNN but reorders the
# weight on every call; the reordered product alone is 1.2-2.1x faster for every shape of the shipped model
# (bench/bf16_linear.py, 1 thread, Xeon with AMX). Through this wrapper, though, the small layers lost (0.6-1.0x:
# its per-call Python cost is as large as the saving), so, as in float32, only large weights (the LM head: 1.35-1.8x)
# keep a reordered copy, from one row up.


@functools.cache
def _onednn_bf16_available() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return _onednn_linear_available(torch.bfloat16)


@functools.cache
def _onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """These ops are torch-internal (Inductor's): checked once on a tiny product, so a torch build without them
    or with another signature falls back to `linear` instead of failing."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.linspace(-1, 1, 128, dtype=dtype).view(16, 8)  # no RNG
        x = torch.linspace(1, -2, 64, dtype=dtype).view(-1, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT),
                                               None, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-4 if dtype == torch.float32 else 5e-2))
    except (AttributeError, RuntimeError, TypeError):
        return False


class PrepackedLinear:
    """`linear` for one large weight at CPU inference, through a oneDNN copy of it reordered once.

    The copy is rebuilt whenever the weight is another tensor or was modified in place (an optimizer step), and
    never used where autograd needs the product (training) or off CPU, where plain `linear` runs. Large weights
    only, from one row up (float32: PACK_MIN_ELEMENTS above; bfloat16: BF16_PACK_NOTE).
    """

    def __init__(self) -> None:
        self._weight: torch.Tensor | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    @staticmethod
    def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
        # oneDNN's op has no autograd kernel: no gradient would reach the weight, nor x through a frozen weight
        if x.device.type != "cpu" or x.dtype != weight.dtype or (
                torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):
            return False
        if weight.numel() < PACK_MIN_ELEMENTS or x.numel() == 0:
            return False
        if x.dtype == torch.bfloat16:  # BF16_PACK_NOTE
            return _onednn_bf16_available()
        return x.dtype == torch.float32 and _onednn_linear_available()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.applies(x, weight):
            return linear(x, weight, bias, pad_single=True)
        version = _version(weight)
        if weight is not self._weight or version != self._version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
            self._weight, self._version = weight, version
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor tracks no version; it cannot be modified outside that mode
        return 0


class _Linear(nn.Linear):
    # Keep the stored [out, in] layout at CPU inference (model/cpu_layout.py): for a weight something other than
    # F.linear also reads as a matrix.
    keep_layout = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks (q/kv up-projections by heads, gate/up): this rank's rows of W."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, parallel.local_size(out_features, "output features"), bias=bias)


class RowParallelLinear(_Linear):
    """Input features split across ranks (o_proj, down): partial sums, all-reduced here unless `reduce` is off
    (the MoE sums its experts and shared expert first, then reduces once). A bias is added once, after."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: bool = True) -> None:
        super().__init__(parallel.local_size(in_features, "input features"), out_features, bias=bias)
        self.sharded = parallel.tp().world > 1
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)
        if self.reduce:
            y = parallel.all_reduce(y)
        elif parallel.tp().rank != 0:
            return y  # the bias goes into the later sum once
        return y + self.bias if self.bias is not None else y


class ReplicatedLinear(_Linear):
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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). Dense layers and the shared expert (whose sum the MoE reduces:
    `reduce` off)."""

    def __init__(self, hidden: int, inter: int, reduce: bool = True) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter)
        self.up_proj = ColumnParallelLinear(hidden, inter)
        self.down_proj = RowParallelLinear(inter, hidden, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """Default RoPE. `interleave` rotates pairs (2i, 2i+1) (GPT-J; GLM-5 MLA and indexer); otherwise (i, i+d/2)
    (NeoX; DeepSeek-V3.2's indexer). Interleaved outputs come back de-interleaved, as in transformers: a fixed
    permutation applied to both q and k, so dot products are unchanged.
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def table(self, positions: torch.Tensor) -> RotaryTable:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return RotaryTable(freqs.cos(), freqs.sin())  # [N, dim/2] each


# Up to this many tokens (decode, verification, a short prompt beside decodes) a rotation is one matmul per tensor;
# beyond, elementwise. One forward's 32 rotations (the default model) per path, 2 threads: 64 tokens 1.3 vs 2.2 ms,
# 96 1.6 vs 2.5, 128 about even, 512 5.8 vs 5.3, 2048 17 vs 12.
ROPE_MATRIX_MAX_TOKENS = 96


class RotaryTable:
    """The rotations of one forward's positions, shared by every layer.

    Rotating (and de-interleaving) is linear in x, so each position's rotation is a [D, D] matrix and applying
    it is one batched matmul, instead of a dozen slice/multiply/concatenate ops per tensor per layer. Matrices
    are built on first use per (width, layout, dtype); dims past the rope dims (the indexer's key and query
    carry theirs first) pass through unchanged.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._cos_sin: torch.Tensor | None = None
        self._matrices: dict[tuple[int, bool, torch.dtype], torch.Tensor] = {}

    def matrix(self, width: int, interleave: bool, dtype: torch.dtype) -> torch.Tensor:
        key = (width, interleave, dtype)
        if key not in self._matrices:
            N, half = self.cos.shape
            # Every entry of a rotation is one of cos, -sin, sin, 1 or 0 at a fixed place: one product of
            # [cos | sin] with a constant 0/+-1 pattern plus the pass-through diagonal builds all N at once,
            # exactly (one nonzero term per entry), in one op instead of a scatter per entry kind (0.1-0.15 ms
            # per matrix at decode, where an MTP draft builds its own every call).
            pattern, diagonal = _rotation_pattern(half, width, interleave, self.cos.device)
            if self._cos_sin is None:
                self._cos_sin = torch.cat([self.cos, self.sin], dim=1)
            with torch.autocast(self.cos.device.type, enabled=False):  # exact fp32 values, cast once below
                r = torch.addmm(diagonal, self._cos_sin, pattern).view(N, width, width)
            self._matrices[key] = r.to(dtype)
        return self._matrices[key]

    def rotate(self, x: torch.Tensor, interleave: bool) -> torch.Tensor:
        """x: [N, ..., D] with the rope dims first in the last axis (all of it for MLA's rope slice)."""
        if x.shape[0] > ROPE_MATRIX_MAX_TOKENS:  # prefill: [N, D, D] matrices would cost more than they save
            return self._rotate_elementwise(x, interleave)
        r = self.matrix(x.shape[-1], interleave, x.dtype)
        return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), r).view(x.shape)

    def _rotate_elementwise(self, x: torch.Tensor, interleave: bool) -> torch.Tensor:
        half = self.cos.shape[1]
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
        cos, sin = self.cos.view(shape).to(x.dtype), self.sin.view(shape).to(x.dtype)
        rot, rest = x[..., : 2 * half], x[..., 2 * half :]
        a, b = (rot[..., 0::2], rot[..., 1::2]) if interleave else rot.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


@functools.cache
@torch.inference_mode(False)  # cached for good: usable by training after an inference-mode call
def _rotation_pattern(half: int, width: int, interleave: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """([2 half, width^2], [width^2]): row i of the pattern places cos_i, row half + i places sin_i, in the
    flattened [width, width] rotation (out_i = x_a cos - x_b sin, out_{half+i} = x_b cos + x_a sin, with (a, b)
    the pair's input dims); the second tensor is 1 on the pass-through diagonal past the rope dims. Built once per
    device on the host (by the first forward, the warm-up before any CUDA graph capture)."""
    i = torch.arange(half)
    a, b = (2 * i, 2 * i + 1) if interleave else (i, half + i)
    p = torch.zeros(2 * half, width, width)
    p[i, a, i], p[half + i, b, i] = 1.0, -1.0
    p[i, b, half + i], p[half + i, a, half + i] = 1.0, 1.0
    d = torch.zeros(width, width)
    d.diagonal()[2 * half :] = 1.0
    return p.flatten(1).to(device), d.flatten().to(device)
