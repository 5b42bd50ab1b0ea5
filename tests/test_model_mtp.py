"""The MTP layer against the reference §3.8 formula, written here on top of transformers' own decoder layer
(transformers drops the MTP layer, so its decoder block for layer L is built by declaring L+1 layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.batch import ForwardBatch
from model.kv_cache import KVCache
from model.loader import load_model
from tests.model_fixtures import TINY, make_checkpoint, pin_index_ties

L = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mtp"), seed=4)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_mtp_step(ckpt, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """z = eh_proj([enorm(emb(t_{i+1})), hnorm(h_i)]); z' = block_L(z) at the positions of h; out = norm(z')."""
    from safetensors.torch import load_file
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    dense = TINY["first_k_dense_replace"]
    cfg = GlmMoeDsaConfig.from_pretrained(
        ckpt, num_hidden_layers=L + 1, indexer_types=["full"] * (L + 1),
        mlp_layer_types=["dense"] * dense + ["sparse"] * (L + 1 - dense))
    pin_index_ties()
    hf = GlmMoeDsaForCausalLM.from_pretrained(ckpt, config=cfg, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    w = load_file(str(ckpt / "model.safetensors"))
    p = f"model.layers.{L}."
    e = hf.model.embed_tokens(next_ids)
    z = F.linear(torch.cat([rms(e, w[p + "enorm.weight"]), rms(hidden, w[p + "hnorm.weight"])], -1),
                 w[p + "eh_proj.weight"])[None]
    S = z.shape[1]
    pos = torch.arange(S)[None]
    mask = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]
    z, _ = hf.model.layers[L](z, attention_mask=mask, position_ids=pos,
                              position_embeddings=hf.model.rotary_emb(z, pos))
    return rms(z[0], w[p + "shared_head.norm.weight"])


def test_mtp_step_matches_reference_formula(ckpt):
    model = load_model(ckpt)
    assert model.has_mtp
    ids = torch.randint(2, 96, (24,), generator=torch.Generator().manual_seed(0))  # longer than index_topk
    with torch.inference_mode():
        h = model(ids, ForwardBatch.single(24))
        out = model.mtp(ids[1:], h[:-1], ForwardBatch.single(23))
        logits = model.mtp_logits(out)
    with torch.no_grad():
        ref = reference_mtp_step(ckpt, h[:-1].clone(), ids[1:])
        ref_logits = F.linear(ref, model.lm_head.weight)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_mtp_recursive_step_feeds_normed_output(ckpt):
    """Depth 2: the second step takes the first step's normed output and the token after next."""
    model = load_model(ckpt)
    ids = torch.randint(2, 96, (20,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h = model(ids, ForwardBatch.single(20))
        first = model.mtp(ids[1:], h[:-1], ForwardBatch.single(19))
        second = model.mtp(ids[2:], first[:-1], ForwardBatch.single(18))
    with torch.no_grad():
        ref_first = reference_mtp_step(ckpt, h[:-1].clone(), ids[1:])
        ref_second = reference_mtp_step(ckpt, ref_first[:-1], ids[2:])
    assert (second - ref_second).abs().max().item() <= 1e-4


def test_mtp_cached_steps_equal_full(ckpt):
    """The MTP layer's own cache: incremental steps give the full-sequence result."""
    model = load_model(ckpt)
    ids = torch.randint(2, 96, (16,), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 8, 4, torch.float32)
    with torch.inference_mode():
        h = model(ids, ForwardBatch.single(16))
        full = model.mtp(ids[1:], h[:-1], ForwardBatch.single(15))
        parts = [model.mtp(ids[1:6], h[:5], ForwardBatch.single(5, 0, cache))]
        parts += [model.mtp(ids[t + 1 : t + 2], h[t : t + 1], ForwardBatch.single(1, t, cache)) for t in range(5, 15)]
    assert (torch.cat(parts) - full).abs().max().item() <= 1e-4


def test_checkpoint_without_mtp_serves_without_it(tmp_path, caplog):
    path = make_checkpoint(tmp_path / "nomtp", mtp=False)
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # declared but not stored
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        model = load_model(path)
    assert not model.has_mtp
    assert "speculative decoding is unavailable" in caplog.text
