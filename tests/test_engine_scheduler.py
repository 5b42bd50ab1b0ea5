"""Block manager and scheduler on their own: no model, sequences driven by hand."""

from __future__ import annotations

import pytest

from service.engine.block_manager import BlockManager
from service.engine.sampling_params import SamplingParams
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence, SequenceGroup, SequenceStatus


def new_seq(prompt_len: int, n: int = 1, rid: str = "r") -> Sequence:
    group = SequenceGroup(rid, list(range(1, prompt_len + 1)), SamplingParams(n=n))
    for i in range(n):
        seq = Sequence(group, i, None, None)
        if i:
            seq.status = SequenceStatus.FORKING
        group.seqs.append(seq)
    return group.seqs[0]


def advance(out, token: int = 7) -> None:
    """What the engine does after a step: computed tokens move on; a finished chunk samples a token."""
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(token)


def test_block_manager_allocate_fork_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = new_seq(10, n=2)
    assert bm.blocks_needed(parent, 10) == 3
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    child = parent.group.seqs[1]
    assert bm.can_fork(parent)
    src, dst = bm.fork(parent, child)
    # Two full prompt blocks shared, the partial third copied into a block of the child's own.
    assert child.block_table[:2] == parent.block_table[:2]
    assert src == parent.block_table[2] and dst not in parent.block_table
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2, 1]
    bm.free(parent)
    assert bm.num_free_blocks == 5  # the shared blocks stay: the child holds them
    bm.free(child)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)
    with pytest.raises(RuntimeError, match="out of cache blocks"):
        bm.allocate(new_seq(40), 40)


def test_fork_on_a_block_boundary_copies_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    parent = new_seq(8, n=2)
    bm.allocate(parent, 8)
    parent.num_computed_tokens = 8
    assert bm.fork(parent, parent.group.seqs[1]) is None
    assert bm.ref_counts[parent.block_table[0]] == 2 and bm.num_free_blocks == 2


def test_budget_decodes_first_then_chunked_prefill_fcfs() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = new_seq(6, rid="a"), new_seq(12, rid="b"), new_seq(3, rid="c")
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 6), ("b", 4)]  # b is chunked by the budget
    advance(out)
    out = sched.schedule()
    # a decodes first (1 token), b's prefill goes on (8), c's prefill starts in what is left (1).
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 8), ("c", 1)]
    advance(out)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 1), ("c", 2)]
    assert out.num_batched_tokens == 4


def test_max_num_seqs_counts_the_choices_a_request_will_fork() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=100)
    sched.add(new_seq(4, rid="a"))
    sched.add(new_seq(4, n=3, rid="b"))
    out = sched.schedule()
    assert [s.request_id for s, _ in out.scheduled] == ["a"]  # b needs 3 slots, only 2 are left


def test_preempts_newest_when_blocks_run_out_and_requeues_it_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = new_seq(4, rid="a"), new_seq(4, rid="b"), new_seq(4, rid="c")
    for s in (a, b, c):
        sched.add(s)
    advance(sched.schedule())  # three prompts, one block each: the cache is full
    assert bm.num_free_blocks == 0
    out = sched.schedule()  # each decode needs a second block: c (newest) gives way to a, then b to itself
    assert [s.request_id for s, _ in out.scheduled] == ["a"]
    assert [s.request_id for s in out.preempted] == ["c", "b"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # older first
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.output_token_ids == [7]
    assert sched.num_preemptions == 2
    advance(out)
    assert [(s.request_id, n) for s, n in sched.schedule().scheduled] == [("a", 1)]  # b needs 2 blocks, 1 free
    sched.remove(a)
    out = sched.schedule()  # b recomputes prompt + its generated token; c does not fit yet
    assert [(s.request_id, n) for s, n in out.scheduled] == [("b", 5)]


def test_remove_frees_blocks_wherever_the_sequence_is() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    a, b = new_seq(5, rid="a"), new_seq(5, rid="b")
    sched.add(a)
    sched.add(b)
    sched.schedule()  # a fully, b's first chunk (1 token)
    sched.remove(a)
    sched.remove(b)
    assert not sched.running and not sched.waiting and bm.num_free_blocks == 8
