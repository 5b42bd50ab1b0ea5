"""Which grouped GEMM (one launch for many experts' products of different row counts) this torch can run.

`torch.nn.functional.grouped_mm` (torch >= 2.12; also on CPU in 2.13 for fp32, bf16 and fp16) or the older
`torch._grouped_mm` (torch 2.8-2.11, CUDA bf16 only): a [M, K] x [G, K, N] -> [M, N] with int32 cumulative group
ends `offs` on the device. Both want every stride a multiple of 16 bytes. Whether a (device, dtype) runs it is
checked once, on a small product against plain matmuls, so an unsupported build falls back instead of failing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("glm_serve.model")

ALIGN_BYTES = 16  # the grouped kernels' stride alignment (CUTLASS's on CUDA; checked on CPU as well)


# On CPU a bf16/fp16 product goes through oneDNN, which builds (JITs) a kernel per shape and caches it: a row count
# it has not seen costs 2.5-4 ms per product against 0.4 ms cached (256 x 320, 300-900 rows, 2 threads). Expert row
# counts change every training step, so every expert product paid that: 100 ms per grouped backward in the default
# model's training step against 15 ms with repeated counts. Rounding each group's count up to one of 8 steps per
# power of two keeps the shapes few (about 100 up to 8,192 rows, inside oneDNN's 1,024-kernel cache) for at most
# 12.5% more rows. Only for many rows (prefill, training): a decode step's few rows per expert take few counts
# anyway, and its forward stays free of the host read the padding needs.
ROUNDING_BITS = 3  # 2^3 = 8 sizes per power of two
PAD_MIN_ROWS = 256


def pads_rows(x: torch.Tensor) -> bool:
    """Whether x's grouped products round their group sizes up (`padded_counts`): reduced precision on CPU, at
    least `PAD_MIN_ROWS` rows."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] >= PAD_MIN_ROWS


def padded_counts(counts: torch.Tensor) -> torch.Tensor:
    """Each count rounded up to a multiple of 2^(floor(log2 count) - ROUNDING_BITS) (itself when that is below 1)."""
    octave = counts.clamp(min=1).float().log2().floor().long()
    step = torch.pow(2, (octave - ROUNDING_BITS).clamp(min=0))
    return (counts + step - 1) // step * step


def op() -> Callable[..., torch.Tensor] | None:
    """The grouped GEMM of this torch, public API first; None when it has neither."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether x [M, H] through stacked expert weights w1 [E, 2I, H] and w2 [E, H, I] (used transposed) can take
    the grouped GEMM: one dtype the device runs it in, and rows of H and of I that keep 16-byte strides."""
    if not (x.dtype == w1.dtype == w2.dtype and _stacked(w1) and _stacked(w2)):
        return False  # FP8 stacks (block scales beside them) land here: they take the per-expert loop
    size = x.element_size()
    # Rows of x (H) and of the hidden activations (I); a transposed stack's rows are its output features.
    rows = [w1.shape[-1], w2.shape[-1]] + [w.shape[-2] for w in (w1, w2) if not w.is_contiguous()]
    if any((n * size) % ALIGN_BYTES for n in rows):
        return False
    return works(x.device.type, x.device.index, x.dtype)


def _stacked(w: torch.Tensor) -> bool:
    """[E, N, K] stored contiguous, or with each expert's matrix stored transposed (model/cpu_layout.py)."""
    return w.is_contiguous() or w.transpose(-1, -2).is_contiguous()


@functools.cache
def works(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    """Checked once per device and dtype on a small product (with an empty group) against per-group matmuls;
    the path chosen is logged either way. Reads a value back to the host, so it runs in the first, eager forward
    (a CUDA graph is captured after warm-up steps)."""
    mm = op()
    where = f"{device_type} {str(dtype).removeprefix('torch.')}"
    if mm is None:
        log.info("moe: this torch has no grouped_mm; experts run one product each (%s)", where)
        return False
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(6, 32, generator=gen, device=device).to(dtype)
    w = torch.randn(3, 16, 32, generator=gen, device=device).to(dtype)
    ends = torch.tensor([2, 2, 6], dtype=torch.int32, device=device)
    try:
        with torch.autocast(device_type, enabled=False):  # the reference matmuls below must stay in fp32
            got = mm(x, w.transpose(1, 2), offs=ends).float()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        log.info("moe: grouped_mm unavailable on %s (%s); experts run one product each", where,
                 str(e).splitlines()[0][:200])
        return False
    with torch.autocast(device_type, enabled=False):
        want = torch.cat([x[:2].float() @ w[0].float().T, x[2:].float() @ w[2].float().T])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        log.warning("moe: grouped_mm disagrees with per-expert matmuls on %s; experts run one product each", where)
        return False
    log.info("moe: experts through grouped_mm on %s", where)
    return True
