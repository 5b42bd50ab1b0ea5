"""Automatic prefix caching, vLLM V1's scheme: hash-chained full blocks, reference counts, and an LRU queue of
freed blocks that still hold a cached prefix.

A full block's hash covers its parent block's hash, its token ids and the request's extra keys (the
`cache_salt`, on the first block only: the chain carries it to every later block). Two sequences whose tokens
agree up to the end of block j under one salt have equal hashes for blocks 0..j, and equal cache entries
there: every cache a block holds (MLA latent, DSA indexer key, the MTP layer's latent and key) is causal.

The MTP layer is the exception to "a block's entries depend only on its tokens and its prefix": its entry at
position i is computed from token i + 1 (reference §3.8), so the entry at a block's last position depends on
the first token of the next block, which the hash does not cover, and a block's MTP entries exist only where
the MTP layer ran over it (not for n > 1 choices, not in a sequence's last step, not with speculation off). So
each cached block records how many of its leading positions hold valid MTP entries (`mtp_len`) and, when all
do, the token that followed the block when they were written (`mtp_next`); a sequence that drafts reuses a
block's MTP entries only up to there (see BlockManager.match).

Hash functions (`--prefix-caching-hash-algo`): `builtin` (default) is Python's `hash` of (parent, token tuple,
salt): 64 bits, the fastest we measured (~0.7 us per 16-token block against ~2.6 for sha256 and ~3.9 for
blake2b, which lacks sha256's CPU instructions), and never leaves the engine process. Accidental collisions are
negligible (a lookup meets one with probability ~cached blocks / 2^64), but the tuple hash of integers is not
collision-resistant: a tenant who can choose tokens could craft a block that collides with another tenant's
prefix. `sha256` (256 bits, cryptographic) is for servers shared by mutually distrusting tenants, together
with per-tenant `cache_salt`s.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

HASH_ALGOS = ("builtin", "sha256")
BlockHash = Hashable  # int (builtin) or bytes (sha256)
Hasher = Callable[[BlockHash | None, Sequence[int], str | None], BlockHash]

_SHA_ROOT = bytes(32)  # the parent of a first block


def _hash_builtin(parent: BlockHash | None, tokens: Sequence[int], salt: str | None) -> BlockHash:
    return hash((parent, tuple(tokens), salt))


def _hash_sha256(parent: BlockHash | None, tokens: Sequence[int], salt: str | None) -> BlockHash:
    h = hashlib.sha256(parent if parent is not None else _SHA_ROOT)  # type: ignore[arg-type]
    h.update(array("q", tokens).tobytes())  # one block size per engine: a fixed width, no separator needed
    if salt is not None:
        data = salt.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()


def make_hasher(algo: str) -> Hasher:
    if algo == "builtin":
        return _hash_builtin
    if algo == "sha256":
        return _hash_sha256
    raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, got {algo!r}")


@dataclass
class PrefixHit:
    """What a waiting sequence may skip: its first `num_tokens` positions are in the cache.

    blocks: cached blocks shared by reference (positions [0, len(blocks) * block_size)).
    copy_src: when num_tokens ends inside a block, the cached block whose leading positions are reused: the
        sequence writes the rest of that block, so it gets a private copy instead of a reference.
    num_queried: tokens looked up (0 when the sequence may not read the cache), for the hit-rate counters.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    copy_src: int | None = None
    num_queried: int = 0


class BlockPool:
    """Every block's reference count and, for blocks holding a cached prefix, its hash and MTP coverage.

    Free blocks wait in two queues: blocks that hold nothing reusable, taken first, and blocks that keep their
    hash, in LRU order (least recently freed first). A cached free block is evicted (its hash forgotten) only
    when an allocation finds no other free block; taking a cached block for a hit removes it from the queue.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.plain: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.mtp_len = [0] * num_blocks
        self.mtp_next: list[int | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.plain) + len(self.lru)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def take(self) -> int:
        """A free block for new content, held once: a plain one if any, else the least recently freed cached one."""
        if self.plain:
            block = self.plain.popleft()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            self._forget(block)
            self.num_evictions += 1
        else:
            raise RuntimeError("out of cache blocks")
        self.ref_counts[block] = 1
        return block

    def ref(self, block: int) -> None:
        """One more holder (a hit, a fork); a cached free block leaves the free queue."""
        if self.ref_counts[block] == 0:
            del self.lru[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; at zero the block is free, at the LRU tail if it still holds a cached prefix."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.lru[block] = None
            else:
                self.plain.append(block)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block: int, block_hash: BlockHash, mtp_len: int, mtp_next: int | None) -> None:
        """Offer a held, fully computed block to the cache under `block_hash`.

        A block already cached keeps its entry. When another block already holds the same tokens, the one with
        more valid MTP entries stays cached and the other becomes a plain block (duplicates arise when two
        sequences compute one prefix at once, or from a partly reused block's private copy).
        """
        if self.block_hash[block] is not None:
            return
        other = self.cached.get(block_hash)
        if other is not None:
            if self.mtp_len[other] >= mtp_len:
                return
            self._forget(other)
            if self.ref_counts[other] == 0:
                del self.lru[other]
                self.plain.append(other)
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        self.mtp_len[block], self.mtp_next[block] = mtp_len, mtp_next

    def extend_mtp(self, block: int, block_hash: BlockHash, mtp_len: int, mtp_next: int | None) -> None:
        """More of a cached block's MTP entries are valid now (written after the block was registered)."""
        if self.block_hash[block] == block_hash and self.cached.get(block_hash) == block and \
                mtp_len > self.mtp_len[block]:
            self.mtp_len[block], self.mtp_next[block] = mtp_len, mtp_next

    def _forget(self, block: int) -> None:
        del self.cached[self.block_hash[block]]
        self.block_hash[block] = None
        self.mtp_len[block], self.mtp_next[block] = 0, None

    def reset(self) -> int:
        """Forget every cached prefix held by a free block (the held ones stay); returns how many."""
        dropped = list(self.lru)
        for block in dropped:
            self._forget(block)
        self.lru.clear()
        self.plain.extend(dropped)
        return len(dropped)

    def consistency_errors(self) -> list[str]:
        """Broken invariants, if any (for tests and debugging): each block is in exactly one of held / plain
        free / cached free, and the hash map and per-block hashes agree."""
        errors = []
        plain, lru = set(self.plain), set(self.lru)
        if len(plain) != len(self.plain):
            errors.append("a block is twice in the plain free queue")
        for b in range(self.num_blocks):
            held = self.ref_counts[b] > 0
            places = held + (b in plain) + (b in lru)
            if self.ref_counts[b] < 0 or places != 1:
                errors.append(f"block {b}: refs {self.ref_counts[b]}, plain {b in plain}, lru {b in lru}")
            h = self.block_hash[b]
            if h is None and b in lru:
                errors.append(f"block {b} waits in the LRU queue without a hash")
            if h is not None and self.cached.get(h) != b:
                errors.append(f"block {b}'s hash maps to {self.cached.get(h)}")
            if b in plain and h is not None:
                errors.append(f"plain free block {b} keeps a hash")
        for h, b in self.cached.items():
            if self.block_hash[b] != h:
                errors.append(f"hash map entry for block {b} is stale")
        return errors
