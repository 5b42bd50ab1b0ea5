"""One step's flat batch on the device, before its per-step tensors are built: what the runner prepares for the
main forward and the MTP proposer for a draft step, and what a CUDA graph bucket refills its static batch from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.batch import ForwardBatch
from model.kv_cache import KVCache


@dataclass
class StepInputs:
    """ForwardBatch's arguments."""

    positions: torch.Tensor  # [N]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [B, W]
    slot_mapping: torch.Tensor  # [N]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def batch(self, cache: KVCache) -> ForwardBatch:
        """The ForwardBatch of the eager forward over `cache`."""
        return ForwardBatch(self.positions, self.query_lens, self.context_lens, self.block_tables,
                            self.slot_mapping, cache)


__all__ = ["StepInputs"]
