"""Supervised attention heads (model/attn_supervision.py): their targets, their loss, and that they train."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.attn_supervision import head_loss, parse_heads, supervision_losses, targets
from model.batch import ForwardBatch
from model.train import losses, set_sparse
from tests.test_train import tiny_model


def test_targets_on_a_hand_worked_sequence():
    x = torch.tensor([[5, 7, 9, 5, 7, 3]])
    y = torch.tensor([[7, 9, 5, 7, 3, 9]])  # x shifted by one, then the next token
    keys = {kind: [row.nonzero().flatten().tolist() for row in targets(x, y, kind)[0]]
            for kind in ("prev", "induction", "pointer")}
    assert keys["prev"] == [[], [0], [1], [2], [3], [4]]
    # x_3 = 5 was seen at 0, followed by position 1; x_4 = 7 at 1, followed by 2; the rest are new.
    assert keys["induction"] == [[], [], [], [1], [2], []]
    # Where the token about to come already is: 5 at 0 (query 2), 7 at 1 (query 3), 9 at 2 (query 5).
    assert keys["pointer"] == [[], [], [0], [1], [], [2]]


def test_pointer_skips_tokens_seen_too_often():
    x = torch.tensor([[1, 1, 1, 1, 1, 2, 1]])
    y = torch.tensor([[1, 1, 1, 1, 2, 1, 2]])
    hits = targets(x, y, "pointer")[0].sum(-1).tolist()
    assert hits == [1, 2, 3, 4, 0, 0, 1]  # the sixth query would have five 1s to point at: no target


def test_head_loss_is_minus_log_mass_on_the_targets():
    target = torch.tensor([[[True, False, False], [False, True, True], [False, False, False]]])
    perfect = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]])
    assert head_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 3, 3), 1 / 3)
    assert head_loss(uniform, target).item() == pytest.approx((math.log(3) + math.log(1.5)) / 2, rel=1e-5)
    none = torch.zeros_like(target)
    probs = uniform.clone().requires_grad_(True)
    loss = head_loss(probs, none)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph: a batch without targets does not break the step


def test_parse_heads():
    assert parse_heads("prev:0.0, pointer:3.1") == {"prev": (0, 0), "pointer": (3, 1)}
    assert parse_heads("") == {}
    for bad in ("copying:0.0", "prev:0", "prev:a.b"):
        with pytest.raises(ValueError):
            parse_heads(bad)


def test_copy_loss_is_the_lm_loss_of_one_heads_output_on_pointer_queries():
    model = tiny_model()
    set_sparse(model, False)
    tokens = torch.randint(0, 8, (2, 13), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    B, S = x.shape
    fb = ForwardBatch(torch.arange(S).repeat(B), [S] * B, [S] * B)
    fb.collect = []
    model(x.reshape(-1), fb)
    got = supervision_losses(fb.collect, x, y, {"copy": (1, 1)}, model)["copy"]
    out = fb.collect[1]["out"]  # [B*S, nh, v]
    v = out.shape[-1]
    has = targets(x, y, "pointer").any(-1).reshape(-1)
    w = model.model.layers[1].self_attn.o_proj.weight[:, v:2 * v]
    logits = model.model.norm(out[:, 1] @ w.T) @ model.lm_head.weight.T
    want = F.cross_entropy(logits[has], y.reshape(-1)[has])
    assert 0 < has.sum() < has.numel() and got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert model.model.layers[1].self_attn.o_proj.weight.grad[:, :v].abs().sum() == 0  # only that head's slice
    assert model.model.layers[1].self_attn.o_proj.weight.grad[:, v:].abs().sum() > 0


def test_losses_add_the_supervision_in_the_lm_stages_only():
    model = tiny_model()
    tokens = torch.randint(0, 8, (2, 13), generator=torch.Generator().manual_seed(0))  # small vocab: repeats
    heads = parse_heads("prev:0.0,induction:1.1")
    dense = losses(model, tokens, "dense", 0.3, heads, 0.5)
    assert {"prev", "induction"} <= set(dense)
    want = dense["lm"] + 0.3 * dense["mtp"] + 0.5 * (dense["prev"] + dense["induction"])
    assert dense["total"].item() == pytest.approx(want.item(), rel=1e-5)
    warm = losses(model, tokens, "warmup", 0.3, heads, 0.5)
    assert "prev" not in warm and warm["total"].item() == pytest.approx(warm["kl"].item())
    plain = losses(model, tokens, "dense", 0.3)
    assert "prev" not in plain and plain["lm"].item() == pytest.approx(dense["lm"].item(), rel=1e-5)


def test_supervision_trains_the_head_to_look_back_one_token():
    torch.manual_seed(0)
    model = tiny_model()
    set_sparse(model, False)  # dense, as in the dense stage: the untrained indexer would hide the previous token
    heads = {"prev": (0, 0)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def prev_loss(tokens: torch.Tensor) -> torch.Tensor:
        B, S = tokens.shape
        fb = ForwardBatch(torch.arange(S).repeat(B), [S] * B, [S] * B)
        fb.collect = []
        model(tokens.reshape(-1), fb)
        return supervision_losses(fb.collect, tokens, tokens.roll(-1, 1), heads)["prev"]

    probe = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    before = prev_loss(probe).item()
    for step in range(60):
        batch = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        prev_loss(batch).backward()
        opt.step()
    after = prev_loss(probe).item()
    assert before > 1.5 and after < 0.1, (before, after)  # ~log(12) -> near 0


def test_only_the_supervised_layers_collect_and_the_others_agree_through_fused_attention(monkeypatch):
    """In the dense stage only the layers of supervised heads record attention; the others take the fused
    (expanded, SDPA) path. The outputs, the collected attention and the gradients match collecting everywhere."""
    from model.attention import MLAttention
    from model.config import ModelConfig
    from model.network import GlmMoeDsaForCausalLM
    from model.train import init_weights

    expanded = MLAttention._attend_expanded
    from tests.test_train import TINY

    model = GlmMoeDsaForCausalLM(ModelConfig.from_dict({**TINY, "num_hidden_layers": 3}))
    init_weights(model, 0.1, 0)
    set_sparse(model, False)  # the dense stage
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))  # >= EXPAND_MIN_QUERIES
    fused = []
    monkeypatch.setattr(MLAttention, "_attend_expanded", lambda self, *a: fused.append(self.layer) or expanded(
        self, *a))
    runs = {}
    for layers in (None, frozenset({1})):
        fb = ForwardBatch(torch.arange(24).repeat(2), [24] * 2, [24] * 2)
        fb.collect, fb.collect_layers = [], layers
        model.zero_grad()
        h = model(x.reshape(-1), fb)
        h.square().mean().backward()
        runs[layers] = h.detach(), fb.collect, model.model.layers[0].self_attn.q_a_proj.weight.grad.clone()
    (h_all, c_all, g_all), (h_one, c_one, g_one) = runs.values()
    assert [c["layer"] for c in c_all] == [0, 1, 2] and [c["layer"] for c in c_one] == [1]
    assert fused == [0, 2]  # only the second run, only its non-collecting layers
    assert torch.allclose(h_all, h_one, atol=1e-5) and torch.allclose(g_all, g_one, atol=1e-5)
    assert torch.allclose(c_all[1]["attn"], c_one[0]["attn"], atol=1e-6)
    heads = parse_heads("prev:0.0,induction:1.1")
    dense = losses(model, x, "dense", 0.3, heads, 0.5)  # the trainer's own choice: layers 0 and 1 of 3
    assert {"prev", "induction"} <= set(dense) and torch.isfinite(dense["total"])
