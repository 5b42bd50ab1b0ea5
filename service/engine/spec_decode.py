"""The engine's side of MTP speculative decoding: each step, the policy picks the next draft depth, the proposer
catches the MTP cache up and drafts, verified drafts are counted (EngineStats.spec_*) and fed back to the policy
with the step's wall time."""

from __future__ import annotations

import time

from .block_manager import BlockManager
from .model_runner import StepResult
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .spec_policy import AdaptivePolicy, SpecPolicy
from .speculative import MTPProposer


class SpecDecode:
    def __init__(self, proposer: MTPProposer, policy: SpecPolicy, block_manager: BlockManager) -> None:
        self.proposer = proposer
        self.policy = policy
        self.block_manager = block_manager
        k = proposer.k
        self.depth = 0  # drafted at the end of the last step: what this step verifies
        self.num_drafts = self.num_draft_tokens = self.num_accepted = 0
        self.accepted_per_pos = [0] * k
        self.depth_steps = [0] * (k + 1)  # steps that drafted each depth (bench, logs)
        self._t0 = 0.0
        self._decode_only = False
        self._batch = 0
        # Set to a list by a benchmark to record every step: (batch, verified depth, drafted depth, seconds,
        # decode only), the policy's inputs, to set against its choices.
        self.trace: list[tuple[int, int, int, float, bool]] | None = None

    def eligible(self, seq: Sequence) -> bool:
        """Whether `seq` drafts. Under the adaptive policy a seeded sampled request does not: its tokens must
        not depend on what else the server runs, and the depth does."""
        if not self.proposer.eligible(seq):
            return False
        p = seq.params
        return not (isinstance(self.policy, AdaptivePolicy) and p.seed is not None and not p.argmax_only)

    def begin_step(self, sched: SchedulerOutput, t0: float) -> None:
        """A step that computes `sched` began at `t0` (time.perf_counter)."""
        self._t0 = t0
        self._batch = len(sched.scheduled)
        self._decode_only = bool(sched.scheduled) and all(
            n == 1 + len(s.draft_token_ids) and s.num_computed_tokens + 1 == s.num_tokens for s, n in sched.scheduled)

    def count_verified(self, result: StepResult) -> None:
        for v in result.verified:
            v.seq.num_computed_tokens += v.num_accepted
            v.seq.clear_drafts()
            self.num_drafts += 1
            self.num_draft_tokens += v.num_drafts
            self.num_accepted += v.num_accepted
            for pos in range(v.num_accepted):
                self.accepted_per_pos[pos] += 1
            self.policy.observe_verified(v.num_drafts, v.num_accepted)

    def after_step(self, starts: list[tuple[Sequence, int, int]], result: StepResult, num_running: int,
                   max_model_len: int) -> None:
        """Choose the next depth, roll block tables back past rejected drafts, catch up and draft."""
        depth = self.policy.depth(num_running)
        live = [(s, start, r) for s, start, r in starts if not s.is_finished and self.eligible(s)]
        if self.depth:  # this step verified drafts: roll block tables back past the rejected ones
            for seq, _, _ in live:
                self.block_manager.trim(seq, seq.num_tokens)
        self.proposer.propose(live, result.hidden, max_model_len, depth)
        seconds = time.perf_counter() - self._t0
        self.policy.observe_step(self._batch, self.depth, depth, seconds, self._decode_only)
        if self.trace is not None:
            self.trace.append((self._batch, self.depth, depth, seconds, self._decode_only))
        self.depth_steps[depth] += 1
        self.depth = depth

    def stats(self) -> dict:
        """EngineStats' spec_* fields."""
        return dict(spec_num_drafts=self.num_drafts, spec_num_draft_tokens=self.num_draft_tokens,
                    spec_num_accepted_tokens=self.num_accepted, spec_accepted_per_pos=list(self.accepted_per_pos))


__all__ = ["SpecDecode"]
