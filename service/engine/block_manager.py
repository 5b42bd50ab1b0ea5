"""Fixed-size cache blocks: a free list, reference counts and each sequence's block table.

A block holds `block_size` consecutive positions of one sequence in every cache layer (MLA latent, indexer
key, MTP layer). Blocks are shared only between the choices of an n>1 request, for the full blocks of the
prompt they prefilled once; a shared block is never written again (new tokens land in later positions), so
a reference count is all sharing needs.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (kv_cache_usage_perc)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` needs to also hold its next `num_new_tokens` positions."""
        return max(0, cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to cover its next `num_new_tokens` positions."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"out of cache blocks: {seq} needs {need}, {len(self.free_blocks)} free")
        for _ in range(need):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` the cache of `parent`'s computed tokens: full blocks shared, a partial last block copied.

        Returns (src, dst) when a block's content must be copied, None otherwise. The caller checks
        `can_fork` first.
        """
        n = parent.num_computed_tokens
        full = n // self.block_size
        shared = parent.block_table[:full]
        for block in shared:
            self.ref_counts[block] += 1
        child.block_table = list(shared)
        child.num_computed_tokens = n
        if n % self.block_size == 0:
            return None
        dst = self.free_blocks.popleft()
        self.ref_counts[dst] = 1
        child.block_table.append(dst)
        return parent.block_table[full], dst

    def can_fork(self, parent: Sequence) -> bool:
        return parent.num_computed_tokens % self.block_size == 0 or len(self.free_blocks) >= 1

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Roll the block table back to the blocks positions < num_tokens need (rejected drafts' blocks)."""
        keep = cdiv(num_tokens, self.block_size)
        for block in seq.block_table[keep:]:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody else holds return to the free list."""
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
