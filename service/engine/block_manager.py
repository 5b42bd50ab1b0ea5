"""Fixed-size cache blocks: each sequence's block table, sharing by reference count, and prefix caching.

A block holds `block_size` consecutive positions of one sequence in every cache layer (MLA latent, indexer
key, MTP layer). A block is shared in two ways, and a shared block is never written again (new tokens land in
later positions), so a reference count is all sharing needs:
- the choices of an n>1 request share the full blocks of the prompt they prefilled once (`fork`);
- with prefix caching, a waiting sequence whose leading full blocks are cached (same tokens, same salt) takes
  them instead of computing them (`match`, `admit`). Blocks become cached once fully computed
  (`cache_computed`) and stay cached after their last holder frees them, until an allocation needs the space
  (prefix_cache.BlockPool).
"""

from __future__ import annotations

from collections.abc import Callable

from .prefix_cache import BlockHash, BlockPool, PrefixHit, make_hasher
from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 hash_algo: str = "builtin") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.ref_counts = self.pool.ref_counts
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = make_hasher(hash_algo)
        # Whether a sequence drafts with the MTP layer, so a hit must also cover valid MTP entries (set by the
        # engine when speculative decoding is on).
        self.needs_mtp: Callable[[Sequence], bool] = lambda seq: False
        self.num_queried_tokens = 0  # prefix_cache_queries_total
        self.num_hit_tokens = 0  # prefix_cache_hits_total

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones and cached ones nobody holds."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (kv_cache_usage_perc); cached blocks nobody holds count as free."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` needs to also hold its next `num_new_tokens` positions."""
        return max(0, cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to cover its next `num_new_tokens` positions."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.pool.num_free:
            raise RuntimeError(f"out of cache blocks: {seq} needs {need}, {self.pool.num_free} free")
        for _ in range(need):
            seq.block_table.append(self.pool.take())

    # -- prefix caching ----------------------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Hashes of `seq`'s full blocks of known tokens, extended as its tokens grow (kept on the sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < seq.num_tokens // bs:
            j = len(hashes)
            salt = seq.params.cache_salt if j == 0 else None
            hashes.append(self.hasher(hashes[-1] if j else None, seq.token_ids(j * bs, (j + 1) * bs), salt))
        return hashes

    def match(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix a waiting `seq` may reuse; its last token is always left to compute.

        A sequence that drafts also needs the MTP entries of what it skips: it reuses a block's MTP entries
        only where they were written, and the entry at a block's last position only if it was written with
        the same next token (the one token the hash does not cover). Where a block's MTP entries stop, the hit
        ends inside that block, which the sequence then takes as a private copy and completes; so it
        recomputes just the positions without valid MTP entries, never a whole block as dropping the last hit
        block would. The same copy keeps a fully cached prompt from recomputing its last block: only its last
        token is computed.
        """
        if not self.enable_prefix_caching or seq.group.wants_prompt_logprobs:
            return PrefixHit()  # prompt logprobs need every prompt position's logits
        bs, pool = self.block_size, self.pool
        mtp = self.needs_mtp(seq)
        blocks: list[int] = []
        cached = 0
        for j, block_hash in enumerate(self.block_hashes(seq)):
            block = pool.lookup(block_hash)
            if block is None:
                break
            usable = bs
            if mtp:
                usable = pool.mtp_len[block]
                end = (j + 1) * bs
                if usable == bs and (end >= seq.num_tokens or seq.token_ids(end, end + 1)[0] != pool.mtp_next[block]):
                    usable = bs - 1
            blocks.append(block)
            cached += usable
            if usable < bs:
                break
        cached = min(cached, seq.num_tokens - 1)
        full = cached // bs
        copy_src = blocks[full] if cached % bs else None
        return PrefixHit(blocks[:full], cached, copy_src, seq.num_tokens)

    def can_admit(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Whether `seq` can start on `hit` and compute its next `num_new_tokens` positions."""
        need = cdiv(hit.num_tokens + num_new_tokens, self.block_size) - len(hit.blocks)
        # Hit blocks (and the copy's source) that nobody holds leave the free queue when taken.
        taken = [b for b in hit.blocks if self.ref_counts[b] == 0]
        pinned = hit.copy_src is not None and self.ref_counts[hit.copy_src] == 0
        return need <= self.pool.num_free - len(taken) - pinned

    def admit(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int) -> tuple[int, int] | None:
        """Start a waiting `seq` on `hit` and allocate its next `num_new_tokens` positions.

        Returns (src, dst) when a block must be copied before the step runs: `src` stays unwritten until then
        (blocks are written only by a forward), even if this step's later allocations take it.
        """
        assert seq.num_computed_tokens == 0 and not seq.block_table, f"{seq} is not waiting"
        for block in hit.blocks:
            self.pool.ref(block)
        seq.block_table = list(hit.blocks)
        seq.num_cached_blocks = len(hit.blocks)
        seq.num_computed_tokens = hit.num_tokens
        seq.num_mtp_tokens = hit.num_tokens if self.needs_mtp(seq) else 0
        copy = None
        if hit.copy_src is not None:
            self.pool.ref(hit.copy_src)  # pinned while this sequence's blocks are taken
            copy = (hit.copy_src, self.pool.take())
            seq.block_table.append(copy[1])
        self.allocate(seq, num_new_tokens)
        if copy is not None:
            self.pool.release(copy[0])  # back at the LRU tail: just used
        self.num_queried_tokens += hit.num_queried
        self.num_hit_tokens += hit.num_tokens
        return copy

    def cache_computed(self, seq: Sequence) -> None:
        """Offer `seq`'s newly fully computed blocks to the prefix cache, with their MTP coverage."""
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if not self.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        hashes = self.block_hashes(seq)
        for j in range(seq.num_cached_blocks, full):
            mtp_len = min(bs, max(0, seq.num_mtp_tokens - j * bs))
            end = (j + 1) * bs
            # MTP at the block's last position read the token after it, so that token is known.
            nxt = seq.token_ids(end, end + 1)[0] if mtp_len == bs else None
            self.pool.register(seq.block_table[j], hashes[j], mtp_len, nxt)
        seq.num_cached_blocks = full

    def mtp_written(self, seq: Sequence, first: int) -> None:
        """`seq`'s MTP entries from position `first` on were written late (deferred catch-up): blocks it already
        offered to the cache gain that coverage."""
        bs = self.block_size
        if not self.enable_prefix_caching:
            return
        for j in range(first // bs, min(seq.num_cached_blocks, cdiv(seq.num_mtp_tokens, bs))):
            mtp_len = min(bs, seq.num_mtp_tokens - j * bs)
            nxt = seq.token_ids((j + 1) * bs, (j + 1) * bs + 1)[0] if mtp_len == bs else None
            self.pool.extend_mtp(seq.block_table[j], seq.block_hashes[j], mtp_len, nxt)

    # -- sharing and freeing -----------------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` the cache of `parent`'s computed tokens: full blocks shared, a partial last block copied.

        Returns (src, dst) when a block's content must be copied, None otherwise. The caller checks
        `can_fork` first.
        """
        n = parent.num_computed_tokens
        full = n // self.block_size
        shared = parent.block_table[:full]
        for block in shared:
            self.pool.ref(block)
        child.block_table = list(shared)
        child.num_computed_tokens = n
        if n % self.block_size == 0:
            return None
        dst = self.pool.take()
        child.block_table.append(dst)
        return parent.block_table[full], dst

    def can_fork(self, parent: Sequence) -> bool:
        return parent.num_computed_tokens % self.block_size == 0 or self.pool.num_free >= 1

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Roll the block table back to the blocks positions < num_tokens need (rejected drafts' blocks)."""
        keep = cdiv(num_tokens, self.block_size)
        for block in reversed(seq.block_table[keep:]):
            self.pool.release(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references, caching its computed blocks first. Tail blocks are released first, so of
        one sequence's blocks the tail is evicted before the head that more requests share."""
        self.cache_computed(seq)
        for block in reversed(seq.block_table):
            self.pool.release(block)
        seq.block_table = []
        seq.num_cached_blocks = 0
