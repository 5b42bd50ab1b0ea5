"""The CPU fast paths of the network's small building blocks equal their plain definitions: `linear` (the
small-batch GEMM orientation) and `PrepackedLinear` (the LM head through oneDNN) equal F.linear, `RotaryTable`
(rotation as one matmul) equals rotating pairs of dims written out here, and the indexer's tiled top-k and the
batch's piecewise mask equal their whole-tensor forms."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import layers
from model.layers import PACK_MIN_ELEMENTS, SMALL_BATCH_ROWS, PrepackedLinear, Rotary, linear

CONFIG = Path(__file__).parents[1] / "model/weights/glm-5-tiny-py/config.json"


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 40])
@pytest.mark.parametrize("pad_single", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("wx", [False, True])
def test_linear_equals_f_linear(rows, pad_single, bias, wx, monkeypatch):
    """Both ways of computing a skinny product (the CPU picks one: `skinny_wx_pays`) give F.linear's result."""
    monkeypatch.setattr(layers, "skinny_wx_pays", lambda dtype, tall: wx)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 24, generator=g), torch.randn(56, 24, generator=g)
    b = torch.randn(56, generator=g) if bias else None
    got = linear(x, w, b, pad_single=pad_single)
    assert got.shape == (rows, 56) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = x.view(1, rows, 24)  # leading dims are kept
    torch.testing.assert_close(linear(x3, w, b, pad_single=pad_single), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 33, 300])
def test_prepacked_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(PACK_MIN_ELEMENTS // 128, 128, generator=g)
    x, b = torch.randn(rows, 128, generator=g), torch.randn(w.shape[0], generator=g)
    head = PrepackedLinear()
    with torch.inference_mode():
        assert head.applies(x, w) == torch.backends.mkldnn.is_available()  # from one row up
        assert not head.applies(x, w[:64]) and not head.applies(x[:0], w)  # small weight, no rows
        torch.testing.assert_close(head(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(head(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
        x3 = x.view(1, rows, 128)[:, :, :]
        torch.testing.assert_close(head(x3, w), F.linear(x3, w), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(head(x[::2], w), F.linear(x[::2], w), rtol=1e-4, atol=1e-4)  # strided rows


def test_prepacked_linear_follows_the_weight():
    """The packed copy is rebuilt after an in-place update (an optimizer step) and for another tensor, and autograd
    products (training) never go through it."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(PACK_MIN_ELEMENTS // 64, 64, generator=g))
    x = torch.randn(16, 64, generator=g)
    head = PrepackedLinear()
    with torch.no_grad():
        head(x, w)
        w.mul_(-0.5)
        torch.testing.assert_close(head(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
        other = torch.randn_like(w)
        torch.testing.assert_close(head(x, other), F.linear(x, other), rtol=1e-4, atol=1e-4)
    y = head(x, w)
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand_as(w))
    # A frozen weight (the tied head under an MTP-only fine-tune): the gradient must still reach the input
    frozen = w.detach()
    xg = x.clone().requires_grad_()
    head(xg, frozen).sum().backward()
    torch.testing.assert_close(xg.grad, frozen.sum(0).expand_as(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_bf16_head_takes_the_reordered_product_from_one_row(rows):
    """bfloat16 on CPU: a large weight (the LM head) goes through its reordered oneDNN copy from one row up where the
    CPU has bf16 units (else plain `linear`), equals F.linear, and follows an in-place update; small weights and
    mixed dtypes never do."""
    from model.layers import _onednn_bf16_available

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(PACK_MIN_ELEMENTS // 64, 64, generator=g).bfloat16()
    x, b = torch.randn(rows, 64, generator=g).bfloat16(), torch.randn(w.shape[0], generator=g).bfloat16()
    head = PrepackedLinear()
    with torch.inference_mode():
        assert head.applies(x, w) == _onednn_bf16_available()
        for _ in range(2):
            ref = F.linear(x.float(), w.float(), b.float())
            torch.testing.assert_close(head(x, w, b).float(), ref, rtol=2e-2, atol=5e-2)
            w.mul_(-1)
    assert not head.applies(x, w[:64])  # small weight
    assert not head.applies(x.float(), w)  # fp32 input, bf16 weight


def rotate_reference(x: torch.Tensor, pos: torch.Tensor, dim: int, theta: float, interleave: bool) -> torch.Tensor:
    """Rotate the first `dim` dims by pos * theta^(-2i/dim); outputs de-interleaved; the rest unchanged.
    Angles in float32 as transformers computes them (at position 4095 fp64 angles differ by ~1e-4)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = (pos[:, None].float() * inv_freq).double()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (dim // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    rot, rest = x[..., :dim].double(), x[..., dim:]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if interleave else rot.chunk(2, dim=-1)
    out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (5, 3, 16), (5, 2, 32), (100, 3, 16), (100, 2, 32)])  # k, q heads,
def test_rotary_table_equals_pairwise_rotation(interleave, shape):  # the indexer's rope-first head; 100: elementwise
    from model import layers

    assert (shape[0] > layers.ROPE_MATRIX_MAX_TOKENS) == (shape[0] == 100)
    pos = torch.tensor([0, 1, 7, 300, 4095] * (shape[0] // 5))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    table = Rotary(16, 10000.0).table(pos)
    got = table.rotate(x, interleave)
    torch.testing.assert_close(got, rotate_reference(x, pos, 16, 10000.0, interleave), rtol=1e-5, atol=1e-5)
    assert table.rotate(x, interleave) is not got  # fresh output; the matrix, if any, is reused
    assert len(table._matrices) == (shape[0] <= layers.ROPE_MATRIX_MAX_TOKENS)


def test_expanded_prefill_attention_equals_absorbed(tmp_path, monkeypatch):
    """Long dense query blocks take the expanded form (per-head K/V + SDPA); it must equal the absorbed form,
    for a whole prompt chunk and for a chunk over a cached prefix (index_topk 64 > 40 tokens: dense)."""
    from model import attention
    from model.batch import ForwardBatch
    from model.kv_cache import KVCache
    from model.loader import load_model
    from tests.model_fixtures import make_checkpoint

    model = load_model(make_checkpoint(tmp_path / "m", mtp=False, index_topk=64))
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(3))
    calls = []
    monkeypatch.setattr(attention.MLAttention, "_attend_expanded",
                        lambda self, *a, _f=attention.MLAttention._attend_expanded: calls.append(1) or _f(self, *a))

    def logits() -> torch.Tensor:
        cache = KVCache(model.config, 16, 4, torch.float32)
        with torch.inference_mode():
            head = model(ids[:20], ForwardBatch.single(20, 0, cache))
            tail = model(ids[20:], ForwardBatch.single(20, 20, cache))
            return model.logits(torch.cat([head, tail]))

    expanded = logits()
    assert len(calls) == 2 * model.config.num_hidden_layers
    monkeypatch.setattr(attention, "EXPAND_MIN_QUERIES", 10**9)
    absorbed = logits()
    assert len(calls) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(expanded, absorbed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_elements", [1 << 20, 2 * 50 * 3])  # one tile; tiles of 3 queries (the last short)
def test_indexer_tiled_topk_equals_full_scores(monkeypatch, tile_elements):
    """Long query blocks at inference keep only each tile's top-k over the keys before the tile's key limit; it
    must select what the full [B, Q, T] scores would, masked keys never outranking visible ones."""
    from model import indexer
    from model.config import ModelConfig

    cfg = ModelConfig.from_dict(json.loads(CONFIG.read_text()) | {"index_topk": 8})
    monkeypatch.setattr(indexer, "TILE_ELEMENTS", tile_elements)
    idx = indexer.Indexer(cfg, 1)
    g = torch.Generator().manual_seed(5)
    B, Q, H, D, T = 2, 11, cfg.index_n_heads, cfg.index_head_dim, 50
    qp, wp = torch.randn(B, Q, H, D, generator=g), torch.randn(B, Q, H, generator=g)
    keys_t = torch.randn(B, D, T, generator=g)
    # Causal past a prefix of 20 keys (row j sees keys <= 20 + j, so tiles stop at key_limit), plus random holes.
    hidden = (torch.arange(T) > 20 + torch.arange(Q)[:, None]) | (torch.rand(B, Q, T, generator=g) < 0.3)
    fb = SimpleNamespace(masked_out_rows=lambda q0, q1, k1: hidden[:, q0:q1, :k1], key_limit=lambda q0, q1: 20 + q1)
    got = idx._topk_tiled(qp, wp, keys_t, fb)
    full = torch.einsum("bqh,bqht->bqt", wp, torch.relu(torch.einsum("bqhd,bdt->bqht", qp, keys_t)))
    masked = full.masked_fill(hidden, float("-inf"))
    want = masked.topk(cfg.index_topk, dim=-1).values
    assert got.shape == want.shape
    # ReLU makes exact ties (all heads negative: score 0), so compare the selected scores, not the indices.
    torch.testing.assert_close(masked.gather(2, got).sort(-1).values, want.sort(-1).values)
    assert not hidden.gather(2, got).any()  # every row has more than k visible keys


@pytest.mark.parametrize("qlens", [[5, 2, 7], [4, 4, 4]])  # ragged (padding rows) / uniform
@pytest.mark.parametrize("cached", [True, False])
def test_batch_mask_pieces_equal_the_whole_mask(cached, qlens):
    """Long DSA prefill reads the attention mask a tile of query rows at a time (`masked_out_rows`) and at the selected
    keys only (`masked_out_at`), never whole: both, and the whole mask, must equal the mask written out here, for a
    batch over a paged cache and for a cache-free forward."""
    from model.batch import ForwardBatch
    from model.config import ModelConfig
    from model.kv_cache import KVCache

    cached_lens = [9, 0, 3] if cached else [0, 0, 0]
    B, Q, T = 3, max(qlens), max(q + c for q, c in zip(qlens, cached_lens, strict=True))
    whole = torch.ones(B, Q, T, dtype=torch.bool)  # hidden unless causal and in context
    for b in range(B):
        for j in range(Q):
            if j >= qlens[b]:
                whole[b, j, 0] = False  # a padding row sees key 0 only
            else:
                whole[b, j, : cached_lens[b] + j + 1] = False

    def make() -> ForwardBatch:
        if not cached:
            return ForwardBatch(torch.cat([torch.arange(q) for q in qlens]), qlens, qlens, allow_groups=False)
        pos = torch.cat([torch.arange(c, c + q) for q, c in zip(qlens, cached_lens, strict=True)])
        tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
        slots = torch.cat([tables[b][p // 4] * 4 + p % 4 for b, p in enumerate(pos.split(qlens))])
        cache = KVCache(ModelConfig.from_dict(json.loads(CONFIG.read_text())), 12, 4, torch.float32)
        return ForwardBatch(pos, qlens, [q + c for q, c in zip(qlens, cached_lens, strict=True)], tables, slots,
                            cache, allow_groups=False)

    assert torch.equal(make().masked_out, whole)
    assert torch.equal(make().attend_mask, ~whole)
    fresh = make()  # nothing built yet: the pieces come from positions
    assert torch.equal(torch.cat([fresh.masked_out_rows(q0, min(Q, q0 + 3)) for q0 in range(0, Q, 3)], 1), whole)
    for q0 in range(0, Q, 3):  # a tile of rows may stop at key_limit: every key past it is hidden from them
        q1 = min(Q, q0 + 3)
        limit = fresh.key_limit(q0, q1)
        assert limit <= T and whole[:, q0:q1, limit:].all() and not whole[:, q0:q1, limit - 1].all()
        assert torch.equal(fresh.masked_out_rows(q0, q1, limit), whole[:, q0:q1, :limit])
    index = torch.randint(0, T, (B, Q, 4), generator=torch.Generator().manual_seed(0))
    index[:, :, 0] = 0  # key 0: the one padding rows see
    assert torch.equal(fresh.masked_out_at(index), whole.gather(2, index))
    assert "masked_out" not in fresh.__dict__
