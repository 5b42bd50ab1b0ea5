"""Weights stored transposed for float32 inference on the CPU: same values, shapes and names, other strides.

A decode step reads every weight once, and a model bigger than the last-level cache (the shipped one is 67 MB in
float32) reads them from memory. MKL reads a [out, in] weight given to `F.linear` (x @ W^T, W^T a transposed
operand) markedly slower from memory than the same product with W^T stored contiguous ([in, out]). On the 2-core
AMD EPYC, 1 thread, caches flushed before each call, 1 / 2 / 16 rows: 640x256 70.5 / 72.2 / 118.4 us as stored vs
52.0 / 59.1 / 108.9 us transposed; the routed experts' grouped GEMM (12 x 320x256 then 12 x 256x160, top-2) at
1 / 2 / 16 tokens 125 / 166 / 622 vs 100 / 120 / 510 us. With the weights in cache the linears are about level, so
a once-per-process timing could not choose; the engine decodes the shipped model 1.09-1.15x faster at batch 1-16
(bench/cpu_layout.py, bench/README.md). bfloat16 goes through oneDNN, where the layout made no difference (within
10% either way), so only float32 is re-strided.

The parameter stays a [out, in] tensor (a transposed view of the [in, out] storage): loading, tensor-parallel
sharding and every reader see the same shape; `F.linear` and torch's grouped GEMM take either layout. The LM head
and the embedding it is tied to keep theirs (the head goes through its own reordered oneDNN copy), and so does
`kv_b_proj` (`_Linear.keep_layout`): the absorbed attention reads it per head through bmm, which ran slower on
the transposed layout at GLM-5's kv_lora_rank of 512 (4 heads, one row, cold: 26 -> 46 us and 41 -> 56 us for
its two products; the decode forward of the DeepSeek-V3-shaped bench checkpoint 4.86 ms with it transposed,
4.45 without, 4.75 with nothing transposed).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import _Linear
from .moe import Experts


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """The same values re-strided so that the last two dimensions' transpose is contiguous."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def applies(model: nn.Module) -> bool:
    """Every parameter on the CPU in float32 (the engine runs it under inference mode)."""
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def set_transposed(model: nn.Module, on: bool = True) -> int:
    """Re-stride the linear layers' weights and the stacked expert weights of `model` (see the module docstring),
    or with `on` False store them contiguous again (bench/cpu_layout.py's A/B); the number of tensors changed.
    Call only where `applies`."""
    changed = 0
    for module in model.modules():
        if isinstance(module, _Linear) and not module.keep_layout:
            tensors = [module.weight]
        elif isinstance(module, Experts):
            tensors = [module.gate_up_proj, module.down_proj]
        else:
            continue
        for p in tensors:
            if p.dim() < 2 or min(p.shape[-2:]) < 2:
                continue
            if on and p.is_contiguous():
                p.data = transposed(p.data)
            elif not on and not p.is_contiguous() and p.transpose(-1, -2).is_contiguous():
                p.data = p.data.contiguous()
            else:
                continue
            changed += 1
    return changed


__all__ = ["applies", "set_transposed", "transposed"]
