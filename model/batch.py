"""The flat, ragged batch the network runs on: index maps, masks and grouping of one step.

The engine packs the new tokens of several sequences into one flat tensor ``[N]``. Token-wise work (projections,
norms, MoE) runs on that flat tensor; attention needs each sequence's context, so `ForwardBatch` also holds the
index maps, built once per step, that scatter the flat queries into a padded ``[B, Q]`` view and gather each
sequence's cached keys into a padded ``[B, T]`` view (through its block table); the cache itself (`KVCache`)
stores and reads entries by slot.

Without a cache (training, or a whole-prompt forward) the context of a sequence is just its own new tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache, Store

# Attend a batch as one padded [B, Q] block while that pads at most this factor over its real query count.
PAD_LIMIT = 1.25
# Query blocks this long (prefill chunks) take other attention paths than decode and verify rows
# (model/attention.py: the expanded dense form; DSA's choice is made for the block's longest context), so a batch
# that holds both is attended in groups whatever the padding: one decode whose context passes index_topk beside 11
# fresh 128-token prompts put all of them through top-k selection and the masked absorbed form, 194 ms for the
# step instead of 103 ms for 12 such prompts alone (the hidden-64 bench checkpoint, 1 thread).
PREFILL_MIN_QUERIES = 16


@dataclass
class ForwardBatch:
    """Metadata of one forward over a ragged batch of B sequences and N new tokens.

    positions: [N] position of every new token; tokens of a sequence are contiguous and in order.
    query_lens: new tokens per sequence (sums to N).
    context_lens: per sequence, tokens in its context after this step (cached + new). Key ``t`` of a
        sequence is the token at position ``t``; a query at position ``p`` sees keys ``t <= p``.
    block_tables: [B, W] each sequence's cache blocks; slot_mapping: [N] the cache slot of every new token;
        cache: the cache they address. All None for a cache-free forward.
    """

    positions: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    cache: KVCache | None = None
    # Filled by __post_init__ (once per step, shared by every layer).
    q_index: torch.Tensor = field(init=False)  # [B, Q] flat index of each padded query (0 where padding)
    q_valid: torch.Tensor = field(init=False)  # [B, Q]
    flat_to_padded: torch.Tensor = field(init=False)  # [N] index into the flattened [B*Q] view
    key_slots: torch.Tensor | None = field(init=False)  # [B, T] cache slot of each context key
    q_pos: torch.Tensor = field(init=False)  # [B, Q] position of each padded query
    k_pos: torch.Tensor = field(init=False)  # [B, T] position of each key
    k_valid: torch.Tensor = field(init=False)  # [B, T] key lies in its sequence's context
    # Every sequence has Q new tokens (decode, uniform verify, one prompt): padded <-> flat is a plain view.
    uniform: bool = field(init=False)
    # Set by training to collect attention / indexer distributions for the indexer's KL loss and the supervised
    # heads; `collect_layers` limits it to some layers (the others keep the fused attention path).
    collect: list | None = None
    collect_layers: frozenset[int] | None = None
    # A mixed batch (one long prefill chunk next to many decodes) would pad every sequence to the longest query
    # block: 16 decodes beside a 128-token prompt would attend 2048 padded queries instead of 144. Such a batch is
    # attended in groups of similar query length instead (`groups`, each a ForwardBatch over some of the
    # sequences, whose `token_index` gives its tokens' rows in this flat batch); token-wise work stays flat.
    allow_groups: bool = True
    # Pad the key view to this many keys (>= every context length): a CUDA graph's fixed shape
    # (service/engine/cuda_graphs.py); None: the longest context.
    key_len: int | None = None
    groups: list[ForwardBatch] | None = field(init=False, default=None)
    token_index: torch.Tensor | None = field(init=False, default=None)

    def collecting(self, layer: int) -> bool:
        """Whether layer `layer` records its attention into `collect` (training only)."""
        return self.collect is not None and (self.collect_layers is None or layer in self.collect_layers)

    def __post_init__(self) -> None:
        device = self.positions.device
        B = len(self.query_lens)
        Q = max(self.query_lens)
        mixed = min(self.query_lens) < PREFILL_MIN_QUERIES <= Q
        if self.allow_groups and self.cache is not None and (mixed or B * Q > PAD_LIMIT * sum(self.query_lens)):
            self._split()
            return
        starts = torch.tensor([0] + self.query_lens[:-1], device=device).cumsum(0)
        qlens = torch.tensor(self.query_lens, device=device)
        j = torch.arange(Q, device=device)
        self.q_valid = j[None, :] < qlens[:, None]
        self.q_index = torch.where(self.q_valid, starts[:, None] + j[None, :], 0)
        # Token n of sequence b sits at b * Q + (n - starts[b]); built without a boolean mask (whose result size
        # the device would have to report back).
        N = sum(self.query_lens)
        seq = torch.repeat_interleave(torch.arange(B, device=device), qlens, output_size=N)
        self.flat_to_padded = seq * Q + torch.arange(N, device=device) - starts[seq]
        self.q_pos = self.positions[self.q_index]  # [B, Q]
        if self.cache is None:
            # The context is this step's tokens: key t is query t.
            self.k_pos, self.k_valid = self.q_pos, self.q_valid
            self.key_slots = None
        else:
            T = max(self.context_lens)
            if self.key_len is not None:
                if self.key_len < T:
                    raise ValueError(f"key_len {self.key_len} is shorter than a context of {T}")
                T = self.key_len
            bs = self.cache.block_size
            t = torch.arange(T, device=device)
            ctx = torch.tensor(self.context_lens, device=device)
            self.k_valid = t[None, :] < ctx[:, None]
            blocks = self.block_tables[:, torch.clamp(t // bs, max=self.block_tables.shape[1] - 1)]
            self.key_slots = torch.where(self.k_valid, blocks * bs + t % bs, 0)
            self.k_pos = t[None, :].expand(B, T)
        self.uniform = min(self.query_lens) == Q

    def _split(self) -> None:
        """Group the sequences by query length (sorted, each group padded by at most PAD_LIMIT, prefill chunks
        apart from shorter blocks) and build one sub-batch per group. The cache is written through this batch's
        slot_mapping, read through the groups'."""
        ql = self.query_lens
        starts = [0]
        for n in ql[:-1]:
            starts.append(starts[-1] + n)
        groups: list[list[int]] = []
        for i in sorted(range(len(ql)), key=ql.__getitem__):  # ascending: the newcomer is the group's longest
            g = groups[-1] if groups else None
            if (g is not None and (ql[i] < PREFILL_MIN_QUERIES) == (ql[g[0]] < PREFILL_MIN_QUERIES)
                    and (len(g) + 1) * ql[i] <= PAD_LIMIT * (sum(ql[j] for j in g) + ql[i])):
                g.append(i)
            else:
                groups.append([i])
        device = self.positions.device
        self.groups = []
        for g in groups:
            tok = torch.cat([torch.arange(starts[i], starts[i] + ql[i]) for i in g]).to(device)
            sub = ForwardBatch(self.positions[tok], [ql[i] for i in g], [self.context_lens[i] for i in g],
                               self.block_tables[torch.tensor(g, device=device)], self.slot_mapping[tok], self.cache,
                               allow_groups=False)
            sub.token_index = tok
            self.groups.append(sub)

    # The tensors a forward reads that change from step to step for a fixed shape (batch, query length, keys); the
    # others (q_index, q_valid, flat_to_padded, k_pos) follow from the shape alone.
    STEP_TENSORS = ("positions", "slot_mapping", "block_tables", "q_pos", "key_slots", "k_valid")

    def refill(self, other: ForwardBatch) -> None:
        """Copy `other`'s step tensors into this batch's own, in place (a CUDA graph replays reads of these very
        tensors); `other` has the same shape. Masks cached from the old values are dropped."""
        for name in self.STEP_TENSORS:
            getattr(self, name).copy_(getattr(other, name))
        for name in ("masked_out", "attend_mask"):
            self.__dict__.pop(name, None)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_keys(self) -> int:
        """T: keys per sequence in the padded context view."""
        return self.k_pos.shape[1]

    def masked_out_rows(self, q0: int = 0, q1: int | None = None, k1: int | None = None) -> torch.Tensor:
        """[B, q1 - q0, k1] mask, True where key 0..k1 is hidden from padded query row q0..q1 (causal,
        in-context); sliced from masked_out when that exists."""
        if "masked_out" in self.__dict__:
            return self.masked_out[:, q0:q1, :k1]
        q_pos, q_valid = self.q_pos[:, q0:q1], self.q_valid[:, q0:q1]
        masked = self.k_pos[:, None, :k1] > q_pos[:, :, None]
        if self.cache is None:  # padding keys carry token 0's position: only validity hides them
            masked |= ~self.k_valid[:, None, :k1]
        # (with a cache key t sits at position t, and t <= a query's position < its context length: in context)
        if not self.uniform:
            masked |= ~q_valid[:, :, None]
            # Padding query rows see key 0 only, so their softmax stays finite; their outputs are discarded.
            masked[:, :, 0] &= q_valid
        return masked

    def key_limit(self, q0: int, q1: int) -> int:
        """Every key from this index on is hidden from padded query rows q0..q1 (causality), so work on those
        rows may stop there. Python-side, from the lengths: no device sync."""
        if self.cache is None:
            return min(q1, self.num_keys)  # key t is query t
        # Row j < q of a sequence with q new tokens and context c sits at position c - q + j; padding rows see key 0.
        return max(c - q + min(q1, q) if q0 < q else 1 for q, c in zip(self.query_lens, self.context_lens,
                                                                         strict=True))

    # The whole [B, Q, T] mask (True: key hidden from query), built on first use and shared by every layer. Long
    # DSA prefill never builds it: at 16K a 2048-query chunk's mask is 32 MB (64 MB with its complement).
    @functools.cached_property
    def masked_out(self) -> torch.Tensor:
        return self.masked_out_rows()

    @functools.cached_property
    def attend_mask(self) -> torch.Tensor:
        """~masked_out: query may attend key (SDPA's boolean mask)."""
        return ~self.masked_out

    def masked_out_at(self, index: torch.Tensor) -> torch.Tensor:
        """index [B, Q, k] into the keys -> [B, Q, k] mask, True where the key is hidden from its query; from
        positions (or gathered from masked_out when that exists) rather than through the whole mask."""
        if "masked_out" in self.__dict__:
            return self.masked_out.gather(2, index)
        B, Q, k = index.shape
        flat = index.reshape(B, Q * k)
        k_pos, k_valid = self.k_pos.gather(1, flat).view(B, Q, k), self.k_valid.gather(1, flat).view(B, Q, k)
        see = (k_pos <= self.q_pos[:, :, None]) & k_valid & self.q_valid[:, :, None]
        see |= (index == 0) & ~self.q_valid[:, :, None]  # padding rows see key 0 (as in masked_out_rows)
        return ~see

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, Q, ...] (padding rows hold token 0's values; attend_mask hides them)."""
        if self.uniform:
            return x.reshape(self.num_seqs, -1, *x.shape[1:])
        return x.index_select(0, self.q_index.flatten()).view(*self.q_index.shape, *x.shape[1:])

    def to_flat(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, ...] -> [N, ...]."""
        if self.uniform:
            return x.flatten(0, 1)
        return x.flatten(0, 1).index_select(0, self.flat_to_padded)

    def context(self, store: Store, layer: int, new: torch.Tensor, index: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Each sequence's keys of `store` [B, T, D]; or, given index [B, Q, k] into them, only those [B, Q, k, D]
        (sparse attention reads k latents per query, never the whole context). Read from the cache at the
        step's slots; without a cache the context is the new tokens `new` [N, D] themselves."""
        if self.cache is None:
            ctx = self.to_padded(new)
            if index is None:
                return ctx
            B, T = ctx.shape[:2]
            rows = index + torch.arange(B, device=ctx.device)[:, None, None] * T
            return ctx.flatten(0, 1).index_select(0, rows.flatten()).view(*index.shape, -1)
        if index is not None:
            return self.cache.read(store, layer, self.key_slots.gather(1, index.flatten(1)).view(index.shape))
        # Whole blocks where the tables are wide enough; keys past a sequence's length hold stale values that
        # the masks hide.
        nb = -(-self.num_keys // self.cache.block_size)
        if self.block_tables.shape[1] >= nb:
            return self.cache.read_blocks(store, layer, self.block_tables[:, :nb])[:, : self.num_keys]
        return self.cache.read(store, layer, self.key_slots)

    @classmethod
    def single(cls, num_tokens: int, start: int = 0, cache: KVCache | None = None, device: str | torch.device = "cpu"
               ) -> ForwardBatch:
        """One sequence whose cache blocks are 0, 1, 2, ... (reference generate and tests)."""
        positions = torch.arange(start, start + num_tokens, device=device)
        if cache is None:
            return cls(positions, [num_tokens], [start + num_tokens])
        table = torch.arange(cache.num_blocks, device=device)[None, :]
        return cls(positions, [num_tokens], [start + num_tokens], table, positions.clone(), cache)
