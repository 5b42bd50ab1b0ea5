"""How deep the MTP layer drafts next step (0..K): a fixed K, or chosen each step from measurement.

Drafting pays when the tokens a step gains outweigh what it costs: the draft depths themselves (an MTP layer
and an LM head each) and a verify forward of K + 1 tokens per sequence. Both sides move at run time: acceptance
depends on the text, and the cost of K extra tokens per sequence grows with the batch (near zero at batch 1 on
a GPU, close to proportional on a busy CPU). vLLM lets the operator switch drafting off above a fixed batch size;
`AdaptivePolicy` measures instead, per batch-size bucket:

- acceptance: per draft position j, the chance the draft is accepted given the drafts before it were, as a
  moving average over about the last `memory` steps that verified drafts reaching j (so a big batch averages
  more drafts, and steps without drafts forget nothing); a position with few observations leans on the one
  before. Expected tokens per sequence and step at depth k: E(k) = 1 + sum over i <= k of the product of those
  chances up to i. Choices read each chance plus `optimism` standard errors (an upper confidence bound), so a
  depth judged on a few unlucky drafts is tried again rather than written off.
- cost: the wall time of whole engine steps that only decode, per (bucket, depth): the least of the last
  `window` (something else on the machine only ever adds time to a step; a median of them still followed the
  stalls of a busy VM). Only steady steps count (the
  depth verified equals the depth drafted), so a step's time is that depth's.
- choice: the depth with the most tokens per second, E(k) / T(bucket, k). Depths are measured in order from 0
  and the climb stops at the first depth that does not beat the one before by `margin` (tokens per step flatten
  with depth while cost keeps growing, so the score has one peak), or before measuring a depth whose cost,
  extrapolated linearly from the two below it, predicts no such gain; every `refresh_every` steps another depth
  is measured again for two steps (4% of steps): of depth 0 up to one past the best, the one timed longest ago,
  so the baseline is re-timed too. A step time older than `max_age` steps no longer counts, so depths are
  compared on recent times: a depth timed during a load spike (another process on the CPU) cannot keep looking
  slow, or fast, after it. Without a timed step for 2 x `refresh_every` steps (a prefill in every step), it
  drafts nothing.

Policies are pure: the engine feeds them batch sizes, verification counts and step times; tests feed
synthetic ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class SpecPolicy(Protocol):
    max_depth: int

    def depth(self, batch_size: int) -> int:
        """Draft depth for the next step of `batch_size` running sequences (0: no drafts)."""
        ...

    def observe_verified(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's drafts were verified: `num_accepted` of its `num_drafts` passed."""
        ...

    def observe_step(self, batch_size: int, verified_depth: int, drafted_depth: int, seconds: float,
                     decode_only: bool) -> None:
        """A step ended: it verified drafts of `verified_depth` and drafted `drafted_depth` for the next step."""
        ...


class FixedPolicy:
    """Always K drafts (what `--speculative-policy fixed` runs)."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth

    def depth(self, batch_size: int) -> int:
        return self.max_depth

    def observe_verified(self, num_drafts: int, num_accepted: int) -> None:
        pass

    def observe_step(self, batch_size: int, verified_depth: int, drafted_depth: int, seconds: float,
                     decode_only: bool) -> None:
        pass


@dataclass
class _Bucket:
    """Step times of one batch-size bucket, per depth."""

    times: list[deque[tuple[int, float]]]  # the last steps' (call count when timed, seconds), per depth
    tries: list[int]
    calls: int = 0
    last_sample: int = 0  # `calls` when the last steady step was timed
    probe: int = 0
    probe_left: int = 0
    chosen: list[int] = field(default_factory=list)  # how often each depth was returned (stats, tests)


class AdaptivePolicy:
    def __init__(self, max_depth: int, *, prior_acceptance: float = 0.6, memory: float = 20.0,
                 min_samples: int = 2, refresh_every: int = 50, window: int = 7, margin: float = 0.02,
                 optimism: float = 1.0, max_age: int | None = None) -> None:
        if max_depth < 1:
            raise ValueError("an adaptive policy needs max_depth >= 1")
        self.max_depth = max_depth
        self.prior = prior_acceptance
        self.decay = 1.0 - 1.0 / memory
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self.window = window
        self.margin = margin
        self.optimism = optimism
        # Long enough for the refresh probes to re-time every depth they visit before its times expire.
        self.max_age = max_age if max_age is not None else 3 * refresh_every
        self.accepted = [0.0] * max_depth  # per draft position: decayed counts of accepted and tried drafts
        self.tried = [0.0] * max_depth
        self._step_accepted = [0] * max_depth  # this step's, folded in by observe_step
        self._step_tried = [0] * max_depth
        self.buckets: dict[int, _Bucket] = {}

    # -- estimates ---------------------------------------------------------------------------------------------------
    def acceptance(self, optimism: float = 0.0) -> list[float]:
        """Per position, P(draft j accepted | drafts before it accepted), plus `optimism` standard errors; little
        data leans on the position before."""
        out, prior = [], self.prior
        for acc, tried in zip(self.accepted, self.tried, strict=True):
            a = (acc + prior) / (tried + 1.0)
            out.append(min(1.0, a + optimism * (a * (1.0 - a) / (tried + 1.0)) ** 0.5))
            prior = a
        return out

    def expected_tokens(self, depth: int, optimism: float = 0.0) -> float:
        """Tokens per sequence a step at `depth` emits on average (the bonus token plus accepted drafts)."""
        total, run = 1.0, 1.0
        for a in self.acceptance(optimism)[:depth]:
            run *= a
            total += run
        return total

    def seconds(self, bucket: int, depth: int) -> float | None:
        """The least of the recent step times of `depth` in `bucket` (None: fewer than `min_samples` of them):
        stalls from other work only ever add time (tests/test_spec_policy.py: with the median, 0.79x)."""
        b = self.buckets.get(bucket)
        if b is None:
            return None
        recent = [t for call, t in b.times[depth] if b.calls - call <= self.max_age]
        return min(recent) if len(recent) >= self.min_samples else None

    def score(self, bucket: int, depth: int) -> float | None:
        """Estimated tokens per second per sequence at `depth` in `bucket`, once measured."""
        t = self.seconds(bucket, depth)
        if t is None or t <= 0:
            return None
        return self.expected_tokens(depth, self.optimism) / t

    @staticmethod
    def bucket_of(batch_size: int) -> int:
        """1, 2-3, 4-7, 8-15, ...: steps of similar batches cost alike."""
        return max(1, batch_size).bit_length()

    def _bucket(self, key: int) -> _Bucket:
        b = self.buckets.get(key)
        if b is None:
            n = self.max_depth + 1
            b = self.buckets[key] = _Bucket([deque(maxlen=self.window) for _ in range(n)], [0] * n, chosen=[0] * n)
        return b

    # -- the choice ------------------------------------------------------------------------------------------------
    def best(self, key: int) -> tuple[int, int | None]:
        """(best measured depth, depth to measure next or None), climbing from depth 0."""
        b = self._bucket(key)
        best, best_score = 0, None
        for k in range(self.max_depth + 1):
            s = self.score(key, k)
            if s is None:
                if k >= 2 and best_score is not None:  # worth measuring? extrapolate the cost of the two below
                    below = self.seconds(key, k - 1), self.seconds(key, k - 2)
                    predicted = 2 * below[0] - below[1] if None not in below else 0.0
                    gain = self.expected_tokens(k, self.optimism) / predicted if predicted > 0 else 0.0
                    if gain <= best_score * (1 + self.margin):
                        return best, None
                # Unmeasured: measure it, unless steady steps never come (then stop climbing here).
                return best, (k if b.tries[k] < 4 * self.min_samples + 4 else None)
            if best_score is not None and s <= best_score * (1 + self.margin):
                return best, None
            best, best_score = k, s
        return best, None

    def depth(self, batch_size: int) -> int:
        if batch_size < 1:
            return 0
        key = self.bucket_of(batch_size)
        b = self._bucket(key)
        b.calls += 1
        if b.probe_left > 0:
            b.probe_left -= 1
            return self._chose(b, b.probe)
        best, explore = self.best(key)
        if best > 0 and b.calls - b.last_sample > 2 * self.refresh_every:
            # No steady step timed for long (prefills ride along in every step, e.g. under steady arrivals): the
            # table is stale, and drafting without evidence could be a loss, so draft nothing until steps are
            # measurable again.
            return self._chose(b, 0)
        if explore is not None:
            b.tries[explore] += 1
            return self._chose(b, explore)
        if b.calls % self.refresh_every == 0:  # re-time another depth: load or the text may have changed
            others = [k for k in range(min(best + 1, self.max_depth) + 1) if k != best]
            b.probe = min(others, key=lambda k: b.times[k][-1][0] if b.times[k] else -1)  # timed longest ago
            b.probe_left = 1
            return self._chose(b, b.probe)
        return self._chose(b, best)

    @staticmethod
    def _chose(b: _Bucket, depth: int) -> int:
        b.chosen[depth] += 1
        return depth

    # -- measurements ----------------------------------------------------------------------------------------------
    def observe_verified(self, num_drafts: int, num_accepted: int) -> None:
        for j in range(min(num_accepted + 1, num_drafts, self.max_depth)):
            self._step_tried[j] += 1
            self._step_accepted[j] += j < num_accepted

    def observe_step(self, batch_size: int, verified_depth: int, drafted_depth: int, seconds: float,
                     decode_only: bool) -> None:
        for j, n in enumerate(self._step_tried):
            if n:
                self.tried[j] = self.tried[j] * self.decay + n
                self.accepted[j] = self.accepted[j] * self.decay + self._step_accepted[j]
        self._step_tried = [0] * self.max_depth
        self._step_accepted = [0] * self.max_depth
        if not decode_only or batch_size < 1 or verified_depth != drafted_depth or seconds <= 0:
            return
        b = self._bucket(self.bucket_of(batch_size))
        k = drafted_depth
        b.last_sample = b.calls
        b.times[k].append((b.calls, seconds))
        b.tries[k] = 0


def make_policy(kind: str, max_depth: int) -> SpecPolicy:
    """`fixed` or `adaptive` (see the module docstring)."""
    if kind == "fixed":
        return FixedPolicy(max_depth)
    if kind == "adaptive":
        return AdaptivePolicy(max_depth)
    raise ValueError(f"speculative_policy must be adaptive or fixed, got {kind!r}")


__all__ = ["AdaptivePolicy", "FixedPolicy", "SpecPolicy", "make_policy"]
