"""The paged cache: what every layer keeps per token, addressed by slot.

Per layer it holds the MLA latent (normed c_kv and rotated rope key, `latent_dim` values) and, for layers that
run their own DSA indexer, the indexer key (`index_head_dim` values). Layers ``num_hidden_layers ..`` are the MTP
layers, in the same stores. Slot ``s`` lies in block ``s // block_size`` of every store, so one slot (and one
block table) addresses a token in all of them: sharing or copying a block shares or copies all its entries.
"""

from __future__ import annotations

import enum

import torch

from .config import ModelConfig


class Store(enum.Enum):
    LATENT = "latent"
    INDEX_KEY = "index_key"


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        layers = range(cfg.num_cache_layers)
        self.latent = [torch.zeros(slots, cfg.latent_dim, dtype=dtype, device=device) for _ in layers]
        # MTP layers always score with their own indexer; main layers that share another's top-k store nothing.
        self.index = [torch.zeros(slots, cfg.index_head_dim, dtype=dtype, device=device)
                      if _has_index_key(cfg, i) else None for i in layers]
        self._stores = {Store.LATENT: self.latent, Store.INDEX_KEY: self.index}

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        per_layer = [cfg.latent_dim + (cfg.index_head_dim if _has_index_key(cfg, i) else 0)
                     for i in range(cfg.num_cache_layers)]
        return sum(per_layer) * size

    def buffers(self) -> list[torch.Tensor]:
        """Every allocated tensor (one per layer and store), each [num_blocks * block_size, D]."""
        return [buf for buf in (*self.latent, *self.index) if buf is not None]

    def write(self, store: Store, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values [N, D] into `store` of `layer` at slots [N]."""
        buf = self._stores[store][layer]
        buf.index_copy_(0, slots, values.to(buf.dtype))

    def read(self, store: Store, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The entries at slots [...] -> [..., D]."""
        # index_select, not advanced indexing: the same row gather, several times faster on CPU.
        buf = self._stores[store][layer]
        return buf.index_select(0, slots.flatten()).view(*slots.shape, -1)

    def read_blocks(self, store: Store, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Whole blocks [B, n] -> [B, n * block_size, D]: block_size rows per copy rather than one row per
        slot, so a long context is read at memcpy speed."""
        buf = self._stores[store][layer]
        B, n = blocks.shape
        rows = buf.view(-1, self.block_size * buf.shape[-1]).index_select(0, blocks.flatten())
        return rows.view(B, n * self.block_size, -1)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer and store (a fork's partly filled block)."""
        if not pairs:
            return
        bs = self.block_size
        device = self.latent[0].device
        j = torch.arange(bs)
        src = torch.cat([s * bs + j for s, _ in pairs]).to(device)
        dst = torch.cat([d * bs + j for _, d in pairs]).to(device)
        with torch.inference_mode():
            for buf in self.buffers():
                buf.index_copy_(0, dst, buf[src])


def _has_index_key(cfg: ModelConfig, layer: int) -> bool:
    return cfg.use_indexer and (layer >= cfg.num_hidden_layers or cfg.has_own_indexer(layer))
