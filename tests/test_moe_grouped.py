"""The routed experts through torch's grouped GEMM equal the per-expert loop (fp32 to rounding, bf16 within bf16
tolerance, gradients too), for routings with idle experts, one token, everything on one expert and uneven loads;
expert-parallel shards sum to the whole layer; FP8 stacks take the loop and stay correct."""

from __future__ import annotations

import logging

import pytest
import torch

from model import grouped_gemm
from model.config import ModelConfig
from model.fp8 import attach_scale, dequantize_blockwise, quantize_blockwise
from model.moe import Experts, MoE

E, H, I, K = 8, 64, 32, 2
CFG = dict(model_type="glm_moe_dsa", vocab_size=96, hidden_size=H, intermediate_size=96, moe_intermediate_size=I,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E,
           num_experts_per_tok=K, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=12, index_topk=8, index_head_dim=16, index_n_heads=4,
           first_k_dense_replace=1, max_position_embeddings=512)


def experts(dtype: torch.dtype = torch.float32, seed: int = 0) -> Experts:
    ex = Experts(ModelConfig.from_dict(CFG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    return ex.to(dtype)


def routing(kind: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, H], weights [n, K], ids [n, K]) with distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    if kind == "uneven":  # experts 0 and 5 take most slots, 3 and 7 none
        p = torch.tensor([8.0, 1, 2, 0, 1, 8, 1, 0])
        ids = torch.stack([torch.multinomial(p, K, generator=g) for _ in range(n)])
    elif kind == "one_expert":  # every token's first choice is expert 6: six experts idle
        ids = torch.stack([torch.tensor([6, 2])] * n)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    return x, torch.rand(n, K, generator=g), ids


def run(ex: Experts, impl: str, x, w, ids) -> torch.Tensor:
    ex.impl = impl
    try:
        return ex(x.to(ex.gate_up_proj.dtype), w, ids)
    finally:
        ex.impl = "auto"


def reference(ex: Experts, x, w, ids) -> torch.Tensor:
    """Token by token, choice by choice: the MoE's definition, in fp32."""
    out = torch.zeros(x.shape[0], H)
    gu, dn = ex.gate_up_proj.float(), ex.down_proj.float()
    for t in range(x.shape[0]):
        for j in range(K):
            e = int(ids[t, j])
            g, u = (gu[e] @ x[t].float()).split(I)
            out[t] += w[t, j] * (dn[e] @ (torch.nn.functional.silu(g) * u))
    return out


CASES = [("random", 1), ("random", 5), ("uneven", 16), ("one_expert", 3), ("uneven", 64)]


@pytest.mark.parametrize("kind,n", CASES)
def test_grouped_equals_loop_fp32(kind, n):
    ex = experts()
    x, w, ids = routing(kind, n)
    loop, grouped = run(ex, "loop", x, w, ids), run(ex, "grouped", x, w, ids)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, reference(ex, x, w, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,n", CASES)
def test_grouped_equals_loop_bf16(kind, n):
    ex = experts(torch.bfloat16)
    x, w, ids = routing(kind, n)
    loop, grouped = run(ex, "loop", x, w, ids), run(ex, "grouped", x, w, ids)
    assert grouped.dtype == torch.bfloat16
    ref = reference(ex, x.bfloat16(), w, ids)
    scale = ref.abs().max().item()
    assert (grouped.float() - ref).abs().max().item() <= 0.02 * scale
    assert (grouped.float() - loop.float()).abs().max().item() <= 0.02 * scale


def test_auto_takes_grouped_where_it_runs(caplog):
    """On this torch (2.13, CPU) fp32 and bf16 take the grouped GEMM; float64 does not and loops, equal to the
    definition; widths off the 16-byte stride alignment loop as well."""
    assert grouped_gemm.op() is not None
    x, w, ids = routing("uneven", 8)
    ex = experts()
    assert grouped_gemm.applies(x, ex.gate_up_proj, ex.down_proj)
    grouped_gemm.works.cache_clear()
    with caplog.at_level(logging.INFO, logger="glm_serve.model"):
        assert not grouped_gemm.applies(x.double(), ex.gate_up_proj.double(), ex.down_proj.double())
    assert "grouped_mm unavailable on cpu float64" in caplog.text
    ex64 = experts(torch.float64)
    torch.testing.assert_close(ex64(x.double(), w, ids).float(), reference(ex64, x, w, ids), rtol=1e-5, atol=1e-5)
    odd = torch.empty(E, 2 * 5, H), torch.empty(E, H, 5)  # I = 5: 20-byte rows
    assert not grouped_gemm.applies(x, *odd)


def test_empty_batch():
    ex = experts()
    out = ex(torch.zeros(0, H), torch.zeros(0, K), torch.zeros(0, K, dtype=torch.long))
    assert out.shape == (0, H)


def test_gradients_equal_loop():
    """Training (the default model's run) backpropagates through the grouped path to the same gradients."""
    x, w, ids = routing("uneven", 12)
    grads = {}
    for impl in ("loop", "grouped"):
        ex = experts()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        ex.impl = impl
        (ex(xi, wi, ids) * torch.linspace(-1, 1, H)).sum().backward()
        grads[impl] = (xi.grad, wi.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    for a, b in zip(grads["loop"], grads["grouped"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_expert_parallel_shards_sum_to_the_layer(impl):
    """Each rank holds E/2 experts; slots routed elsewhere must add nothing (and no NaN from the rows the grouped
    GEMM leaves uncomputed). The sum over ranks is the whole layer; a rank with no slots of its own gives zero."""
    full = experts()
    x, w, ids = routing("uneven", 10)
    want = run(full, "loop", x, w, ids)
    total = torch.zeros_like(want)
    for rank in range(2):
        shard = experts()
        half = E // 2
        with torch.no_grad():
            shard.gate_up_proj = torch.nn.Parameter(full.gate_up_proj[rank * half:(rank + 1) * half].clone())
            shard.down_proj = torch.nn.Parameter(full.down_proj[rank * half:(rank + 1) * half].clone())
        shard.first, shard.expert_parallel = rank * half, True
        part = run(shard, impl, x, w, ids)
        assert torch.isfinite(part).all()
        total += part
        only_other = torch.full((3, K), (1 - rank) * half) + torch.arange(K)
        assert not run(shard, impl, x[:3], w[:3], only_other).any()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_fp8_experts_take_the_loop_and_match_dequantized():
    """FP8 stacks (block scales beside them) are not grouped_mm operands: `auto` loops, dequantizing one expert at
    a time (on CPU; block-scaled scaled_mm on an FP8 GPU), and equals the dequantized weights through the grouped
    GEMM."""
    ex = experts()
    deq = experts()
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(ex, name).detach()
        parts = [quantize_blockwise(w[e]) for e in range(E)]
        q = torch.stack([p[0] for p in parts])
        s = torch.stack([p[1] for p in parts])
        setattr(ex, name, torch.nn.Parameter(q, requires_grad=False))
        attach_scale(getattr(ex, name), s)
        with torch.no_grad():
            getattr(deq, name).copy_(torch.stack([dequantize_blockwise(q[e], s[e]) for e in range(E)]))
    x, w, ids = routing("uneven", 9)
    assert not grouped_gemm.applies(x, ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(ex(x, w, ids), run(deq, "grouped", x, w, ids), rtol=1e-5, atol=1e-5)


def test_moe_layer_output_does_not_depend_on_the_path():
    """The whole layer (router, shared expert) in eval gives the same output either way."""
    moe = MoE(ModelConfig.from_dict(CFG)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(7, H, generator=g)
    outs = []
    for impl in ("loop", "grouped"):
        moe.experts.impl = impl
        with torch.inference_mode():
            outs.append(moe(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_autocast_training_runs_grouped_in_its_dtype():
    """Training on CPU runs under bf16 autocast: the grouped path computes in bf16 as the loop's F.linear calls
    do, returns the input's dtype, and backpropagates to the same gradients within bf16 rounding."""
    x, w, ids = routing("uneven", 12)
    res = {}
    for impl in ("loop", "grouped"):
        ex = experts()
        xi = x.clone().requires_grad_()
        ex.impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ex(xi, w, ids)
        assert out.dtype == torch.float32
        (out * torch.linspace(-1, 1, H)).sum().backward()
        res[impl] = (out.detach(), xi.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    for a, b in zip(res["loop"], res["grouped"], strict=True):
        assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item()


def test_first_check_under_autocast():
    """The one-off check may first run inside a training step's bf16 autocast (a resumed run did): its fp32
    reference products must not be autocast to bf16, or the comparison fails on mixed dtypes."""
    grouped_gemm.works.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert grouped_gemm.works("cpu", None, torch.float32)
            assert grouped_gemm.works("cpu", None, torch.bfloat16)
    finally:
        grouped_gemm.works.cache_clear()


def test_rows_padded_per_expert_change_nothing():
    """On CPU in bf16 each expert's row count is rounded up (oneDNN builds a kernel per row count): outputs and
    gradients equal the unpadded grouped path, for routings with idle experts and one expert taking everything."""
    for kind, n in [*CASES, ("uneven", 300)]:
        x, w, ids = routing(kind, n)
        res = {}
        for pad in (False, True):
            ex = experts(torch.bfloat16)
            ex.pad_rows = pad
            xi = x.bfloat16().requires_grad_()
            out = run(ex, "grouped", xi, w, ids)
            (out.float() * torch.linspace(-1, 1, H)).sum().backward()
            res[pad] = (out, xi.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
        for a, b in zip(res[False], res[True], strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * a.float().abs().max().item())


def test_padded_counts_are_few_and_close():
    counts = torch.arange(0, 8193)
    padded = grouped_gemm.padded_counts(counts)
    assert bool((padded >= counts).all()) and bool((padded[1:] <= counts[1:] * 1.125).all())
    assert torch.equal(padded[:9], counts[:9])  # a decode step's few rows per expert stay as they are
    assert len(padded.unique()) <= 110
    rows = grouped_gemm.PAD_MIN_ROWS
    assert grouped_gemm.pads_rows(torch.zeros(rows, 2, dtype=torch.bfloat16))
    assert not grouped_gemm.pads_rows(torch.zeros(rows - 1, 2, dtype=torch.bfloat16))  # a decode step's few rows
    assert not grouped_gemm.pads_rows(torch.zeros(rows, 2))
