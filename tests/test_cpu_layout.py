"""float32 weights stored transposed for CPU inference (model/cpu_layout.py): the same values, shapes and names
in other strides, so the forward, the experts' grouped GEMM and saving are unchanged; the engine applies it to a
CPU float32 model only, and its greedy tokens are those of the stored layout (and of transformers: the engine
tests run under it)."""

from __future__ import annotations

import pytest
import torch

from model import cpu_layout, grouped_gemm
from model.batch import ForwardBatch
from model.layers import _Linear, linear
from model.loader import hf_state_dict, load_model
from model.moe import Experts
from tests.engine_fixtures import greedy, make_engine, prompts, run_engine
from tests.test_moe_grouped import experts, routing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stacks_and_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if isinstance(m, _Linear) and not m.keep_layout:
            out.append(m.weight)
        elif isinstance(m, Experts):
            out += [m.gate_up_proj, m.down_proj]
    return out


def test_set_transposed_keeps_values_and_the_forward(engine_ckpt):
    model = load_model(engine_ckpt, torch.float32, "cpu").eval()
    ids = torch.tensor([5, 9, 13, 2, 7, 30, 11, 4, 8, 21, 3])  # past index_topk (8): DSA selects
    fb = ForwardBatch(torch.arange(len(ids)), [len(ids)], [len(ids)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        want = model(ids, fb)
        n = cpu_layout.set_transposed(model)
        got = model(ids, fb)
    tensors = _stacks_and_weights(model)
    assert n == len(tensors) > 0
    assert all(not t.is_contiguous() and t.transpose(-1, -2).is_contiguous() for t in tensors)
    kept = [layer.self_attn.kv_b_proj.weight for layer in model.model.layers]  # read per head by bmm too
    assert kept and all(w.is_contiguous() for w in kept)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # what a checkpoint gets is contiguous and equal
    sd = hf_state_dict(model)
    assert all(t.is_contiguous() for t in sd.values())
    assert cpu_layout.set_transposed(model, on=False) == n and all(t.is_contiguous() for t in tensors)
    assert cpu_layout.set_transposed(model, on=False) == 0


def test_linear_takes_the_stored_layout_at_every_row_count():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    wt = cpu_layout.transposed(w)
    for rows in (1, 2, 3, 8, 9, 40):
        x = torch.randn(rows, 32, generator=g)
        torch.testing.assert_close(linear(x, wt), x @ w.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, wt, pad_single=True), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "uneven", "one_expert"])
def test_transposed_expert_stacks_take_the_grouped_gemm_and_match_the_loop(kind):
    ex = experts()
    x, weights, ids = routing(kind, 11)
    ex.impl = "loop"
    with torch.no_grad():
        want = ex(x, weights, ids)
        cpu_layout.set_transposed(ex)
        assert grouped_gemm.applies(x, ex.gate_up_proj, ex.down_proj) == grouped_gemm.works("cpu", None,
                                                                                              torch.float32)
        ex.impl = "auto"
        got = ex(x, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_transposed_stack_with_unaligned_rows_falls_back_to_the_loop():
    x = torch.randn(3, 64)
    w1 = cpu_layout.transposed(torch.randn(4, 6, 64))  # rows of 6 floats: 24 bytes, not a multiple of 16
    w2 = cpu_layout.transposed(torch.randn(4, 64, 3))
    assert not grouped_gemm.applies(x, w1, w2)
    assert not grouped_gemm.applies(x, torch.randn(4, 64, 6).transpose(1, 2), torch.randn(4, 64, 3))  # neither layout


def test_the_engine_stores_cpu_float32_weights_transposed_and_decodes_the_same(engine_ckpt):
    ps = prompts(4, [3, 12, 20, 33])

    def tokens(engine):
        for i, p in enumerate(ps):
            engine.add_request(str(i), p, greedy(10))
        done = run_engine(engine)
        return [done[str(i)][0].token_ids for i in range(len(ps))]

    engine = make_engine(engine_ckpt, num_speculative_tokens=2)
    tensors = _stacks_and_weights(engine.runner.model)
    assert all(t.transpose(-1, -2).is_contiguous() and not t.is_contiguous() for t in tensors)
    transposed = tokens(engine)
    cpu_layout.set_transposed(engine.runner.model, on=False)
    assert tokens(engine) == transposed
    bf16 = make_engine(engine_ckpt, dtype="bfloat16")
    assert all(t.is_contiguous() for t in _stacks_and_weights(bf16.runner.model))
