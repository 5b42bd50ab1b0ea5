"""The network against transformers' GlmMoeDsaForCausalLM (fp32, CPU): logits, greedy tokens, cache, batching."""

from __future__ import annotations

import json

import pytest
import torch

from model.batch import ForwardBatch
from model.generate import generate
from model.kv_cache import KVCache
from model.loader import load_model
from tests.model_fixtures import hf_model, make_checkpoint

TOPK = 8  # TINY's index_topk


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def ckpt_sharded_grouped(tmp_path_factory):
    # Sharded files and group-limited routing (4 groups, keep 2) in one checkpoint.
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), shard_size="20KB", n_group=4, topk_group=2, seed=3)


def ours_full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(ids, ForwardBatch.single(len(ids))))


def ours_cached_logits(model, ids: torch.Tensor, prefill: int, block_size: int = 4) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one by one through the paged cache."""
    cache = KVCache(model.config, (len(ids) + block_size - 1) // block_size, block_size, torch.float32)
    out = []
    with torch.inference_mode():
        out.append(model.logits(model(ids[:prefill], ForwardBatch.single(prefill, 0, cache))))
        for t in range(prefill, len(ids)):
            out.append(model.logits(model(ids[t : t + 1], ForwardBatch.single(1, t, cache))))
    return torch.cat(out)


@pytest.mark.parametrize("which", ["ckpt", "ckpt_sharded_grouped"])
@pytest.mark.parametrize("length", [6, 40])  # below and above index_topk
def test_logits_match_transformers(which, length, request):
    path = request.getfixturevalue(which)
    ids = torch.randint(2, 96, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf_model(path)(ids[None]).logits[0]
    ours = load_model(path)
    diff = (ours_full_logits(ours, ids) - ref).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("length", [6, 40])
def test_cached_decode_equals_full_forward(ckpt, length):
    ours = load_model(ckpt)
    ids = torch.randint(2, 96, (length,), generator=torch.Generator().manual_seed(7))
    full = ours_full_logits(ours, ids)
    cached = ours_cached_logits(ours, ids, prefill=3)
    assert (full - cached).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_full_forward(ckpt):
    ours = load_model(ckpt)
    ids = torch.randint(2, 96, (37,), generator=torch.Generator().manual_seed(11))
    cache = KVCache(ours.config, 10, 4, torch.float32)
    with torch.inference_mode():
        parts = [ours.logits(ours(ids[s : s + 10], ForwardBatch.single(len(ids[s : s + 10]), s, cache)))
                 for s in range(0, 37, 10)]
    assert (torch.cat(parts) - ours_full_logits(ours, ids)).abs().max().item() <= 1e-4


def test_greedy_32_tokens_match_transformers_generate(ckpt):
    prompt = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_model(ckpt).generate(prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 12:].tolist()
    assert len(ref) == 32
    ours = generate(load_model(ckpt), prompt.tolist(), 32)
    assert ours == ref


@pytest.mark.parametrize("mode", ["grouped", "padded", "tiled", "shared-indexer"])
def test_ragged_batch_equals_each_alone(ckpt, tmp_path, monkeypatch, mode):
    """Three sequences at different stages (prefill chunk, decode, fresh prompt) in one forward. The batch is
    attended in query-length groups (ForwardBatch.groups); `padded` forces one padded block instead, `tiled`
    also sends the indexer through its query-tiled path, `shared-indexer` has a layer reusing the previous
    layer's top-k (IndexShare), which then travels group by group."""
    from model import batch, indexer

    if mode == "shared-indexer":
        ckpt = make_checkpoint(tmp_path / "shared", mtp=False)
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, "indexer_types": ["full", "shared", "full"]}))
        from safetensors.torch import load_file, save_file

        (f,) = ckpt.glob("*.safetensors")  # a shared layer has no indexer of its own
        save_file({k: v for k, v in load_file(f).items() if "layers.1.self_attn.indexer." not in k}, f,
                  metadata={"format": "pt"})
    ours = load_model(ckpt)
    assert ours.config.has_own_indexer(1) == (mode != "shared-indexer")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(2, 96, (n,), generator=g) for n in (30, 13, 5)]
    bs = 4
    cache = KVCache(ours.config, 40, bs, torch.float32)
    tables = torch.tensor([list(range(0, 10)), list(range(10, 20)), list(range(20, 30))])
    cached = [20, 12, 0]  # tokens already in the cache per sequence: write them first, one sequence at a time
    with torch.inference_mode():
        for b, (s, c) in enumerate(zip(seqs, cached, strict=True)):
            if c:
                pos = torch.arange(c)
                slots = tables[b][pos // bs] * bs + pos % bs
                ours(s[:c], ForwardBatch(pos, [c], [c], tables[b : b + 1], slots, cache))
        new = [s[c:] for s, c in zip(seqs, cached, strict=True)]
        pos = torch.cat([torch.arange(c, len(s)) for s, c in zip(seqs, cached, strict=True)])
        slots = torch.cat([tables[b][torch.arange(c, len(s)) // bs] * bs + torch.arange(c, len(s)) % bs
                           for b, (s, c) in enumerate(zip(seqs, cached, strict=True))])
        if mode == "tiled":
            monkeypatch.setattr(indexer, "ALL_HEADS_MAX_ELEMENTS", 0)
            monkeypatch.setattr(indexer, "TILE_ELEMENTS", 2 * 30)
        if mode == "padded":
            monkeypatch.setattr(batch, "PAD_LIMIT", 100.0)
        fb = ForwardBatch(pos, [len(n) for n in new], [len(s) for s in seqs], tables, slots, cache)
        assert (fb.groups is None) == (mode == "padded")
        batched = ours.logits(ours(torch.cat(new), fb))
        monkeypatch.undo()
    alone = torch.cat([ours_full_logits(ours, s)[c:] for s, c in zip(seqs, cached, strict=True)])
    assert (batched - alone).abs().max().item() <= 1e-4


def test_a_decode_past_index_topk_beside_dense_prompts_is_attended_apart(tmp_path, monkeypatch):
    """One decode whose context passes index_topk beside six fresh 16-token prompts (dense by definition): the
    padding stays under PAD_LIMIT, yet the batch is attended in two groups, so the prompts keep the dense
    expanded path (no top-k selection: it once sent all of them through DSA at twice the cost) and every row's
    logits are those of its sequence alone."""
    from model.indexer import Indexer

    ours = load_model(make_checkpoint(tmp_path / "c", mtp=False, index_topk=16))
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(2, 96, (n,), generator=g) for n in (30, 16, 16, 16, 16, 16, 16)]
    cached = [29] + [0] * 6
    bs = 4
    cache = KVCache(ours.config, 70, bs, torch.float32)
    tables = torch.arange(70).view(7, 10)
    selected: list[tuple[int, bool]] = []  # (query block length, chose top-k)
    select = Indexer.select

    def spy(self, q, w, k, fb):
        topk, scores = select(self, q, w, k, fb)
        selected.append((max(fb.query_lens), topk is not None))
        return topk, scores

    with torch.inference_mode():
        pos = torch.arange(29)
        ours(seqs[0][:29], ForwardBatch(pos, [29], [29], tables[:1], tables[0][pos // bs] * bs + pos % bs, cache))
        new = [s[c:] for s, c in zip(seqs, cached, strict=True)]
        pos = torch.cat([torch.arange(c, len(s)) for s, c in zip(seqs, cached, strict=True)])
        slots = torch.cat([tables[b][torch.arange(c, len(s)) // bs] * bs + torch.arange(c, len(s)) % bs
                           for b, (s, c) in enumerate(zip(seqs, cached, strict=True))])
        fb = ForwardBatch(pos, [len(n) for n in new], [len(s) for s in seqs], tables, slots, cache)
        assert len(fb.query_lens) * 16 <= 1.25 * sum(fb.query_lens)  # padding alone would not split it
        assert [sub.query_lens for sub in fb.groups] == [[1], [16] * 6]
        monkeypatch.setattr(Indexer, "select", spy)
        batched = ours.logits(ours(torch.cat(new), fb))
        monkeypatch.undo()
    assert selected and all(chose == (q == 1) for q, chose in selected)  # only the decode's group selects
    alone = torch.cat([ours_full_logits(ours, s)[c:] for s, c in zip(seqs, cached, strict=True)])
    assert (batched - alone).abs().max().item() <= 1e-4


def test_sparse_regime_really_drops_tokens(tmp_path):
    """Above index_topk the selection changes the logits: DSA is on, not silently dense."""
    sparse = load_model(make_checkpoint(tmp_path / "s", mtp=False))
    dense = load_model(make_checkpoint(tmp_path / "d", mtp=False, index_topk=4096))
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(1))
    a, b = ours_full_logits(sparse, ids), ours_full_logits(dense, ids)
    assert (a[:TOPK] - b[:TOPK]).abs().max().item() <= 1e-5  # rows with <= topk keys are dense
    assert (a[TOPK:] - b[TOPK:]).abs().max().item() > 1e-3


def test_bfloat16_close_to_float32(ckpt):
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(9))
    f32 = ours_full_logits(load_model(ckpt), ids)
    bf16_model = load_model(ckpt, dtype=torch.bfloat16)
    bf16 = ours_full_logits(bf16_model, ids)
    cached = ours_cached_logits(bf16_model, ids, prefill=5)
    scale = f32.abs().max().item()
    # bf16 keeps 8 mantissa bits. Most rows stay within 5% of the logit range; a few rows differ more where an
    # expert choice or a DSA top-k choice flips (transformers in bf16 does the same: measured mean error 0.026
    # vs our 0.008 on this checkpoint).
    for got in (bf16, cached):
        err = (got - f32).abs()
        assert err.mean().item() <= 0.01 * scale
        assert (err.max(-1).values <= 0.05 * scale).float().mean().item() >= 0.9
        assert (got.argmax(-1) == f32.argmax(-1)).float().mean().item() >= 0.9


def test_sparse_gather_and_dense_mask_paths_agree(ckpt, monkeypatch):
    """The two exact implementations of top-k attention (gather the selected latents / mask dense scores): the
    default choice (a short context's prefill chunk masks, decode gathers), gather everywhere, mask everywhere."""
    from model import attention

    ours = load_model(ckpt)
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(4))
    chosen = ours_cached_logits(ours, ids, prefill=20)
    monkeypatch.setattr(attention, "GATHER_MIN_CONTEXT_RATIO", 0)
    gathered = ours_cached_logits(ours, ids, prefill=20)
    monkeypatch.setattr(attention, "SPARSE_GATHER_MAX_ELEMENTS", 0)
    masked = ours_cached_logits(ours, ids, prefill=20)
    assert (gathered - masked).abs().max().item() <= 1e-5
    assert (chosen - masked).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tile_elements", [1 << 20, 40 * 3])  # one tile; tiles of 3 queries
def test_indexer_all_heads_and_tiled_agree(ckpt, monkeypatch, tile_elements):
    from model import indexer

    monkeypatch.setattr(indexer, "TILE_ELEMENTS", tile_elements)
    ours = load_model(ckpt)
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(8))
    together = ours_cached_logits(ours, ids, prefill=20)
    monkeypatch.setattr(indexer, "ALL_HEADS_MAX_ELEMENTS", 0)
    tiled = ours_cached_logits(ours, ids, prefill=20)
    assert (together - tiled).abs().max().item() <= 1e-5
