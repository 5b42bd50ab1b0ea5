"""Prefix caching without a model: hashing, hits, reference counts, the LRU free queue, MTP validity, and a
simulated engine whose fake cache records what every slot holds, so a wrong hit shows as a wrong slot."""

from __future__ import annotations

import random

import pytest

from service.engine.block_manager import BlockManager
from service.engine.prefix_cache import BlockPool, make_hasher
from service.engine.sampling_params import SamplingParams
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence, SequenceGroup, SequenceStatus

BS = 4


def new_seq(prompt: list[int], rid: str = "r", n: int = 1, **params) -> Sequence:
    group = SequenceGroup(rid, list(prompt), SamplingParams(n=n, **params))
    for i in range(n):
        seq = Sequence(group, i, None, None)
        if i:
            seq.status = SequenceStatus.FORKING
        group.seqs.append(seq)
    return group.seqs[0]


def compute(bm: BlockManager, seq: Sequence, mtp: bool = False) -> None:
    """Admit `seq` on its hit and compute its whole prompt, as one step would (MTP catch-up when `mtp`)."""
    hit = bm.match(seq)
    bm.admit(seq, hit, seq.num_tokens - hit.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    seq.output_token_ids.append(99)  # the sampled token: MTP at the last prompt position reads it
    if mtp:
        seq.num_mtp_tokens = seq.num_computed_tokens
    bm.cache_computed(seq)


def consistent(bm: BlockManager) -> None:
    assert bm.pool.consistency_errors() == []


@pytest.mark.parametrize("algo", ["builtin", "sha256"])
def test_hashes_chain_over_parent_tokens_and_salt(algo: str) -> None:
    bm = BlockManager(16, BS, True, algo)
    base = list(range(1, 13))
    a = bm.block_hashes(new_seq(base + [50]))  # the partial last block has no hash
    assert len(a) == 3 and len(set(a)) == 3
    assert bm.block_hashes(new_seq(base)) == a
    changed = bm.block_hashes(new_seq(base[:5] + [77] + base[6:]))  # a token of block 1
    assert changed[0] == a[0] and changed[1] != a[1] and changed[2] != a[2]  # the chain carries it on
    salted = bm.block_hashes(new_seq(base, cache_salt="tenant-a"))
    assert all(x != y for x, y in zip(salted, a, strict=True))
    assert bm.block_hashes(new_seq(base, cache_salt="tenant-a")) == salted
    assert bm.block_hashes(new_seq(base, cache_salt="tenant-b"))[0] != salted[0]
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        make_hasher("md5")


def test_hit_shares_full_blocks_and_always_leaves_the_last_token() -> None:
    bm = BlockManager(16, BS, True)
    a = new_seq(list(range(1, 11)), "a")  # 10 tokens: blocks 0, 1 full
    compute(bm, a)
    b = new_seq(list(range(1, 9)) + [40, 41, 42], "b")
    hit = bm.match(b)
    assert hit.blocks == a.block_table[:2] and hit.num_tokens == 8 and hit.copy_src is None
    assert bm.admit(b, hit, 3) is None
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    # A prompt that is exactly cached computes only its last token, in a private copy of its last block.
    c = new_seq(list(range(1, 9)), "c")
    hit = bm.match(c)
    assert hit.num_tokens == 7 and hit.blocks == a.block_table[:1] and hit.copy_src == a.block_table[1]
    src, dst = bm.admit(c, hit, 1)
    assert src == a.block_table[1] and dst not in a.block_table and c.block_table == [a.block_table[0], dst]
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (10 + 11 + 8, 0 + 8 + 7)
    for s in (a, b, c):
        bm.free(s)
    consistent(bm)
    assert bm.num_free_blocks == 16 and bm.usage == 0.0  # cached blocks nobody holds count as free


def test_no_hit_across_salts_or_without_caching_or_with_prompt_logprobs() -> None:
    bm = BlockManager(16, BS, True)
    compute(bm, new_seq(list(range(1, 10)), "a", cache_salt="s1"))
    assert bm.match(new_seq(list(range(1, 10)), "b", cache_salt="s2")).num_tokens == 0
    assert bm.match(new_seq(list(range(1, 10)), "b")).num_tokens == 0
    assert bm.match(new_seq(list(range(1, 10)), "b", cache_salt="s1")).num_tokens == 8
    assert bm.match(new_seq(list(range(1, 10)), "b", cache_salt="s1", prompt_logprobs=1)).num_queried == 0
    off = BlockManager(16, BS, False)
    compute(off, new_seq(list(range(1, 10)), "a"))
    assert off.match(new_seq(list(range(1, 10)), "b")).num_tokens == 0 and off.pool.num_cached == 0


def test_freed_blocks_stay_cached_until_needed_lru_and_tail_first() -> None:
    pool_size = 6
    bm = BlockManager(pool_size, BS, True)
    a, c = new_seq(list(range(1, 9)) + [0], "a"), new_seq(list(range(20, 28)) + [0], "c")
    compute(bm, a)  # blocks a0 a1 (+ a partial third)
    compute(bm, c)  # c0 c1 (+ partial)
    a_blocks, c_blocks = a.block_table[:2], c.block_table[:2]
    bm.free(a)
    bm.free(c)
    consistent(bm)
    # The two partial blocks hold no hash: they are reused first, the cached ones after, a's before c's
    # (least recently freed), and of a's the tail block a1 before a0.
    order = [bm.pool.take() for _ in range(pool_size)]
    assert order[2:] == [a_blocks[1], a_blocks[0], c_blocks[1], c_blocks[0]]
    assert bm.pool.num_cached == 0 and bm.pool.num_evictions == 4


def test_hit_revives_a_free_cached_block_and_a_held_block_is_never_evicted() -> None:
    bm = BlockManager(4, BS, True)
    a = new_seq(list(range(1, 9)) + [5], "a")
    compute(bm, a)
    held = a.block_table[:2]
    bm.free(a)
    b = new_seq(list(range(1, 9)) + [6, 7], "b")
    hit = bm.match(b)
    assert hit.blocks == held
    assert not bm.can_admit(b, hit, 2 + 4 * 2 + 1)  # the revived blocks no longer count as free
    bm.admit(b, hit, 2)
    assert [bm.ref_counts[x] for x in held] == [1, 1] and bm.num_free_blocks == 1
    other = new_seq(list(range(60, 64)), "o")
    bm.allocate(other, 4)  # the last free block
    with pytest.raises(RuntimeError, match="out of cache blocks"):
        bm.allocate(other, 8)
    assert all(bm.pool.block_hash[x] is not None for x in held)
    consistent(bm)


def test_mtp_entries_are_reused_only_where_valid_for_the_next_token() -> None:
    bm = BlockManager(32, BS, True)
    bm.needs_mtp = lambda seq: seq.params.n == 1
    a = new_seq(list(range(1, 10)), "a")  # 9 tokens: blocks 0, 1 full; MTP at 7 read token 9 (position 8)
    compute(bm, a, mtp=True)
    assert [bm.pool.mtp_len[x] for x in a.block_table[:2]] == [BS, BS]
    assert bm.pool.mtp_next[a.block_table[1]] == 9
    same_next = new_seq(list(range(1, 10)) + [3], "b")
    assert bm.match(same_next).num_tokens == 8
    # Another token after block 1: its last MTP entry is stale, so the hit stops one token short, in a copy.
    hit = bm.match(new_seq(list(range(1, 9)) + [77, 3], "c"))
    assert hit.num_tokens == 7 and hit.copy_src == a.block_table[1]
    # n > 1 does not draft: it reuses the whole block whatever came next.
    assert bm.match(new_seq(list(range(1, 9)) + [77, 3], "d", n=2)).num_tokens == 8
    # A block written without (all of) its MTP entries: the hit ends where they end.
    e = new_seq(list(range(100, 109)), "e")
    hit = bm.match(e)
    bm.admit(e, hit, 9)
    e.num_computed_tokens, e.num_mtp_tokens = 9, 6  # e.g. the MTP layer had not run over its last step
    e.output_token_ids.append(1)
    bm.cache_computed(e)
    assert [bm.pool.mtp_len[x] for x in e.block_table[:2]] == [BS, 2]
    hit = bm.match(new_seq(list(range(100, 109)) + [1], "f"))
    assert hit.num_tokens == 6 and hit.blocks == e.block_table[:1] and hit.copy_src == e.block_table[1]


def test_a_duplicate_with_more_mtp_entries_replaces_the_cached_block() -> None:
    pool = BlockPool(4)
    x, y = pool.take(), pool.take()
    pool.register(x, "h", 2, None)
    pool.register(y, "h", 1, None)  # worse: ignored, y stays a plain block
    assert pool.lookup("h") == x and pool.block_hash[y] is None
    pool.release(x)
    pool.register(y, "h", 4, 9)  # better: x (free) loses its hash and becomes a plain free block
    assert pool.lookup("h") == y and pool.block_hash[x] is None and x in pool.plain
    assert pool.consistency_errors() == []


def test_scheduler_skips_cached_tokens_counts_only_the_rest_and_copies_first() -> None:
    bm = BlockManager(64, BS, True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=5)
    a = new_seq(list(range(1, 13)) + [50], "a")  # 13 tokens, chunked 5 + 5 + 3
    sched.add(a)
    for _ in range(3):
        out = sched.schedule()
        for s, n in out.scheduled:
            s.num_computed_tokens += n
    a.output_token_ids.append(7)
    a_blocks = list(a.block_table)
    sched.remove(a)  # finished: its three full blocks stay cached
    b, c = new_seq(list(range(1, 13)) + [51, 52], "b"), new_seq(list(range(1, 13)), "c")
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("b", 2), ("c", 1)]  # the budget covers both
    assert b.num_computed_tokens == 12 and c.num_computed_tokens == 11
    assert out.copies == [(a_blocks[2], c.block_table[2])]
    assert b.group.num_cached_tokens == 12 and c.group.num_cached_tokens == 11


def test_preempted_sequence_resumes_from_its_cached_blocks() -> None:
    bm = BlockManager(5, BS, True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = new_seq(list(range(1, 9)), "a"), new_seq(list(range(30, 38)), "b")
    sched.add(a)
    sched.add(b)
    for _ in range(2):  # both prefill; then a's first decode needs a third block, and b gives way
        out = sched.schedule()
        for s, n in out.scheduled:
            s.num_computed_tokens += n
            s.output_token_ids.append(7)
    assert out.preempted == [b] and b.group.num_cached_tokens == 0
    assert not sched.schedule().scheduled[1:]  # b's two cached blocks are all that is free: no room yet
    sched.remove(a)
    out = sched.schedule()
    # b's prompt (two full blocks) comes back from the cache; only its generated token is computed.
    assert [(s.request_id, n) for s, n in out.scheduled] == [("b", 1)] and b.num_computed_tokens == 8
    assert b.group.num_cached_tokens == 0  # usage reports the first scheduling only


# -- a simulated engine ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulated_engine_every_reused_slot_holds_what_the_sequence_would_have_written(seed: int) -> None:
    """Random shared-prefix requests on a small cache, with chunking, preemption and drafting sequences. The fake
    cache stores, per slot, the token prefix its main entry was computed from and the prefix its MTP entry was
    (position i's MTP entry reads token i + 1). Every step checks every computed position of every running
    sequence; at the end every block is free and every hash consistent."""
    rng = random.Random(seed)
    num_blocks, vocab = 14, 3  # few distinct tokens: many partial and mid-block matches
    bm = BlockManager(num_blocks, BS, True)
    bm.needs_mtp = lambda seq: seq.request_id.startswith("m")
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=7)
    main: dict[int, tuple] = {}
    mtp: dict[int, tuple] = {}
    stems = [[rng.randrange(vocab) for _ in range(rng.randrange(3, 14))] for _ in range(3)]
    finished = 0
    max_new = {}
    for i in range(40):
        prompt = rng.choice(stems) + [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        rid = f"{'m' if i % 2 else 'p'}{i}"
        max_new[rid] = rng.randrange(1, 16)
        sched.add(new_seq(prompt, rid))

    def slot(seq: Sequence, p: int) -> int:
        return seq.block_table[p // BS] * BS + p % BS

    hits = 0
    for _ in range(2000):
        if not (sched.waiting or sched.running):
            break
        out = sched.schedule()
        for src, dst in out.copies:
            for j in range(BS):
                for store in (main, mtp):
                    if src * BS + j in store:
                        store[dst * BS + j] = store[src * BS + j]
                    else:
                        store.pop(dst * BS + j, None)
        hits = bm.num_hit_tokens
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            toks = seq.token_ids(0, seq.num_tokens)
            for p in range(start, start + n):
                main[slot(seq, p)] = tuple(toks[: p + 1])
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(vocab))
            if bm.needs_mtp(seq):  # the MTP catch-up over what this step validated
                toks = seq.token_ids(0, seq.num_tokens)
                for p in range(start, seq.num_computed_tokens):
                    mtp[slot(seq, p)] = tuple(toks[: p + 2])
                if seq.num_mtp_tokens == start:
                    seq.num_mtp_tokens = seq.num_computed_tokens
        for seq in list(sched.running):
            toks = seq.token_ids(0, seq.num_tokens)
            for p in range(seq.num_computed_tokens):
                assert main.get(slot(seq, p)) == tuple(toks[: p + 1]), f"{seq}: main entry {p}"
            if bm.needs_mtp(seq):
                for p in range(seq.num_mtp_tokens):
                    assert mtp.get(slot(seq, p)) == tuple(toks[: p + 2]), f"{seq}: MTP entry {p}"
            if len(seq.output_token_ids) >= max_new[seq.request_id]:
                seq.finish("length")
                sched.remove(seq)
                finished += 1
        consistent(bm)
    assert finished == 40 and hits > 100 and sched.num_preemptions > 0, (hits, sched.num_preemptions)
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts) and bm.usage == 0.0
    consistent(bm)
