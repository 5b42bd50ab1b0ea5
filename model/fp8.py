"""Block-scaled FP8 weights as DeepSeek-V3 and GLM-5-FP8 publish them.

A quantized weight W [out, in] is stored as float8_e4m3fn with an fp32 ``weight_scale_inv`` of one value per
128x128 block, [ceil(out/128), ceil(in/128)] (edge blocks padded): W = fp8 * scale, block by block. A weight is
quantized exactly when it is stored as float8 with a scale beside it; config names (`modules_to_not_convert`) are
not trusted, GLM-5-FP8's names a module that does not exist.

Two ways to run one: dequantize to the serving dtype at load (CPU), or keep the FP8 tensor (with its scale attached
as ``weight.scale_inv``) and let `layers.linear` call `fp8_linear`, which uses torch's block-scaled matmul where
the GPU has one and otherwise dequantizes the weight for that one product.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("glm_serve.model")

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
# The products `fp8_linear` can run: everything the network sends through `layers.linear`. kv_b_proj is read as a
# matrix by MLA's absorbed attention, so it is dequantized at load even where FP8 stays FP8 (as vLLM does).
DEQUANTIZE_ALWAYS = ("kv_b_proj.weight",)
# The weights `--quantization fp8` and `model.quantize` quantize: the decoder's projections, as GLM-5-FP8 and
# DeepSeek-V3 ship them. The router (mlp.gate), the indexer's weights_proj, embeddings, norms and heads stay.
QUANTIZABLE = re.compile(r"^model\.layers\.\d+\..*\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
                         r"|wq_b|wk|gate_proj|up_proj|down_proj|eh_proj)\.weight$")


class Fp8FormatError(ValueError):
    """An FP8 checkpoint in a layout glm-serve does not read (the message says what)."""


def check_quantization_config(raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` when it is block FP8 as we read it; None when there is none."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise Fp8FormatError(f"{source}: quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise Fp8FormatError(f"{source}: quantization_config.fmt {qc.get('fmt')!r} is not supported (only 'e4m3')")
    if list(qc.get("weight_block_size") or [BLOCK, BLOCK]) != [BLOCK, BLOCK]:
        raise Fp8FormatError(f"{source}: quantization_config.weight_block_size {qc.get('weight_block_size')} is "
                             f"not supported (only [{BLOCK}, {BLOCK}])")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise Fp8FormatError(f"{source}: quantization_config.activation_scheme must be 'dynamic'")
    return qc


def quantization_config() -> dict[str, Any]:
    """What `model.quantize` writes into config.json (DeepSeek-V3's keys)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
            "activation_scheme": "dynamic"}


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def block_range(start: int, stop: int) -> slice:
    """The scale blocks that cover elements [start, stop) of one dimension."""
    return slice(start // BLOCK, blocks(stop))


def quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] (any float) -> (float8_e4m3fn [R, C], fp32 scale_inv [ceil(R/128), ceil(C/128)]).

    Each block's scale maps its largest magnitude to 448; an all-zero block gets scale 1 so nothing divides by 0.
    """
    R, C = w.shape
    nr, nc = blocks(R), blocks(C)
    padded = F.pad(w.float(), (0, nc * BLOCK - C, 0, nr * BLOCK - R)).view(nr, BLOCK, nc, BLOCK)
    amax = padded.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nr * BLOCK, nc * BLOCK)[:R, :C].contiguous(), scale.contiguous()


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         offset: tuple[int, int] = (0, 0), segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """fp8 w [R, C] * its block scales -> `dtype`, computed in fp32.

    `offset` places w inside the blocks of `scale_inv` (a shard whose slice starts at row r0, col c0 of the stored
    tensor carries the scale blocks from r0 // 128: offset = (r0 % 128, c0 % 128)). `segments` are row counts of
    tensors stacked on dim 0, each with its own scale blocks (a fused gate|up whose halves do not end on a block).
    """
    if segments is not None and len(segments) > 1:
        parts, row, srow = [], 0, 0
        for n in segments:
            nb = blocks(n)
            parts.append(dequantize_blockwise(w[row:row + n], scale_inv[srow:srow + nb], dtype))
            row, srow = row + n, srow + nb
        return torch.cat(parts)
    R, C = w.shape
    r0, c0 = offset
    nr, nc = scale_inv.shape
    if nr * BLOCK < r0 + R or nc * BLOCK < c0 + C:
        raise Fp8FormatError(f"scale_inv {tuple(scale_inv.shape)} does not cover a {R}x{C} weight at offset "
                             f"{offset}")
    # Placed on the scale's block grid (padding to whole blocks), each block is one broadcast multiply.
    grid = F.pad(w.float(), (c0, nc * BLOCK - c0 - C, r0, nr * BLOCK - r0 - R)).view(nr, BLOCK, nc, BLOCK)
    out = (grid * scale_inv.float()[:, None, :, None]).view(nr * BLOCK, nc * BLOCK)
    return out[r0:r0 + R, c0:c0 + C].to(dtype)


def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A kept FP8 weight (scale attached by `attach_scale`) in `dtype`: the run-time fallback of `fp8_linear`."""
    return dequantize_blockwise(weight, weight.scale_inv, dtype, segments=getattr(weight, "segments", None))


def attach_scale(weight: torch.Tensor, scale_inv: torch.Tensor, segments: tuple[int, ...] | None = None) -> None:
    """Hang the scale on the weight, as DeepSeek's reference does, so any `linear(x, weight)` finds it."""
    weight.scale_inv = scale_inv
    weight.segments = segments


def expert(weight: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e` of a stacked [E, ...] weight, carrying its scale when the stack is FP8."""
    w = weight[e]
    if weight.dtype == FP8:
        attach_scale(w, weight.scale_inv[e], getattr(weight, "segments", None))
    return w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ W^T with FP8 activations and weights through torch's block-scaled matmul; None where it cannot run (the
    caller then dequantizes the weight)."""
    K, N = x.shape[-1], weight.shape[0]
    if x.device.type != "cuda" or not scaled_mm_works(x.device, x.dtype):
        return None
    segments = getattr(weight, "segments", None) or ()
    if K % (4 * BLOCK) or N % BLOCK or any(n % BLOCK for n in segments):
        _log_unaligned(N, K)
        return None
    return _scaled_mm(x, weight, weight.scale_inv, bias)


@functools.cache
def _log_unaligned(N: int, K: int) -> None:
    log.info("fp8: %dx%d weights are dequantized per product (scaled_mm wants K %% %d == 0 and N %% %d == 0)",
             N, K, 4 * BLOCK, BLOCK)


def _quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-128-channel scales (DeepSeek's `act_quant`): x [M, K] -> fp8, scales [M, K/128]."""
    M, K = x.shape
    g = x.float().view(M, K // BLOCK, BLOCK)
    scale = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (g / scale[..., None]).to(FP8).view(M, K), scale


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    pad = -M % 4  # cuBLAS wants the token count of 1x128 scales in multiples of 4
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    xq, xs = _quantize_activation(x2)
    y = F.scaled_mm(xq, weight.t(), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                    scale_inv.t(), F.ScalingType.BlockWise128x128, output_dtype=x.dtype)[:M]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


@functools.cache
def scaled_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and GPU run the 1x128 x 128x128 block-scaled matmul, and agree with dequantize + matmul
    on a small product. Checked once per device and dtype; the path chosen is logged either way."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        log.info("fp8: this torch has no torch.nn.functional.scaled_mm; FP8 weights are dequantized per product")
        return False
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        log.info("fp8: sm%d%d has no FP8 matmul; FP8 weights are dequantized per product", *cap)
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(256, 512, generator=gen, device=device)
    x = torch.randn(8, 512, generator=gen, device=device, dtype=dtype)
    q, s = quantize_blockwise(w)
    try:
        got = _scaled_mm(x, q, s, None).float()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        log.warning("fp8: block-scaled scaled_mm unavailable on sm%d%d (%s); FP8 weights are dequantized per "
                    "product", cap[0], cap[1], str(e).splitlines()[0])
        return False
    want = F.linear(x.float(), dequantize_blockwise(q, s))
    err = ((got - want).norm() / want.norm()).item()
    if not math.isfinite(err) or err > 0.05:  # activation rounding to e4m3 alone gives ~2-3%
        log.warning("fp8: block-scaled scaled_mm disagrees with dequantize + matmul (relative error %.3g); FP8 "
                    "weights are dequantized per product", err)
        return False
    log.info("fp8: block-scaled torch scaled_mm on sm%d%d (relative error %.3g vs dequantized)", cap[0], cap[1], err)
    return True
