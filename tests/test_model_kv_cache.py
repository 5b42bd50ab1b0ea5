"""KVCache by slot: one slot addresses a token in every store of every layer (MTP layers included)."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache, Store
from tests.model_fixtures import TINY


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["GlmMoeDsaForCausalLM"], **TINY, "num_nextn_predict_layers": 1,
                                  **overrides})


def test_stores_per_layer_and_bytes_per_token():
    cfg = _cfg(indexer_types=["full", "shared", "full"])
    cache = KVCache(cfg, num_blocks=3, block_size=4, dtype=torch.bfloat16)
    assert len(cache.latent) == len(cache.index) == cfg.num_hidden_layers + 1  # + the MTP layer
    assert cache.index[1] is None and cache.index[3] is not None  # a shared layer keeps no key; MTP always does
    allocated = sum(buf.numel() * buf.element_size() for buf in cache.buffers())
    assert allocated == 12 * KVCache.bytes_per_token(cfg, torch.bfloat16)


def test_write_read_by_slot_blocks_and_copy():
    cfg = _cfg()
    cache = KVCache(cfg, num_blocks=4, block_size=2, dtype=torch.float32)
    slots = torch.tensor([5, 0, 3])
    latent = torch.randn(3, cfg.latent_dim)
    key = torch.randn(3, cfg.index_head_dim)
    cache.write(Store.LATENT, 3, slots, latent)
    cache.write(Store.INDEX_KEY, 3, slots, key)
    assert torch.equal(cache.read(Store.LATENT, 3, slots), latent)
    assert torch.equal(cache.read(Store.INDEX_KEY, 3, slots.view(3, 1)), key.view(3, 1, -1))
    assert not cache.latent[2].any()  # other layers untouched
    # Blocks [2, 0] hold slots 4, 5, 0, 1.
    rows = cache.read_blocks(Store.LATENT, 3, torch.tensor([[2, 0]]))
    assert rows.shape == (1, 4, cfg.latent_dim)
    assert torch.equal(rows[0, 1], latent[0]) and torch.equal(rows[0, 2], latent[1])
    cache.copy_blocks([(2, 3)])  # slots 4, 5 -> 6, 7 in every store
    assert torch.equal(cache.read(Store.LATENT, 3, torch.tensor([7])), latent[:1])
    assert torch.equal(cache.read(Store.INDEX_KEY, 3, torch.tensor([7])), key[:1])
