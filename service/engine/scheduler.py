"""Continuous batching, vLLM v1 style: one token budget per step shared by decodes and prefill chunks.

Each step: running sequences first (oldest first; a decode costs one token, an unfinished prefill takes a
chunk), then waiting sequences in arrival order while budget, sequence slots and cache blocks last. When a
running sequence cannot get a block, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to recompute prompt + generated tokens later.

With prefix caching, a sequence admitted from the queue first takes the longest cached prefix of its tokens
(BlockManager.match) and computes only the rest, so a preempted sequence whose blocks are still cached resumes
almost where it stopped. Blocks are offered to the cache once computed: at the start of the next step for
running sequences, when freed for the others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one step computes: (sequence, number of new tokens) in batch order."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (src, dst) cache blocks to copy before the step runs: a prefix hit that ends inside a cached block.
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: preemption takes from the end
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        if bm.enable_prefix_caching:
            for seq in self.running:  # what the last step computed becomes reusable
                bm.cache_computed(seq)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            uncomputed = seq.num_uncomputed_tokens
            if seq.draft_token_ids:
                # A decode with drafts verifies them in the same step, if budget and blocks allow.
                n = min(uncomputed + len(seq.draft_token_ids), budget)
                if not bm.can_allocate(seq, n):
                    n = uncomputed  # drop the drafts before preempting anyone
                seq.clear_drafts(keep=max(0, n - uncomputed))
            else:
                n = min(uncomputed, budget)
            while not bm.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest and gave up its own blocks
            bm.allocate(seq, n)
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
        if out.preempted:
            return out  # blocks are short: admit nothing new this step (vLLM does the same)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            # A request's first prefill also reserves the slots of the choices that will fork from it.
            seats = 1 + len(seq.group.forking)
            if len(self.running) + seats > self.max_num_seqs:
                break
            hit = bm.match(seq)  # a waiting sequence holds no blocks: it starts on what the cache has
            n = min(seq.num_tokens - hit.num_tokens, budget)
            if not bm.can_admit(seq, hit, n):
                break
            self.waiting.popleft()
            copy = bm.admit(seq, hit, n)
            if copy is not None:
                out.copies.append(copy)
            if seq.index == 0 and seq.group.num_cached_tokens is None:
                seq.group.num_cached_tokens = hit.num_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)  # older than anything still waiting: FCFS puts it first
        self.num_preemptions += 1

    def fork(self, parent: Sequence, children: list[Sequence]) -> list[tuple[int, int]]:
        """Start `children` from `parent`'s prompt cache; returns the (src, dst) blocks to copy.

        A child that finds no free block for its copy recomputes the prompt instead, like a preempted one.
        """
        copies = []
        at = self.running.index(parent) + 1
        for child in children:
            if self.block_manager.can_fork(parent):
                pair = self.block_manager.fork(parent, child)
                if pair is not None:
                    copies.append(pair)
                child.status = SequenceStatus.RUNNING
                self.running.insert(at, child)
                at += 1
            else:
                child.reset_for_recompute()
                self.waiting.appendleft(child)
        return copies

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
