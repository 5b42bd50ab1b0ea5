"""The draft-depth policies on synthetic acceptance and step costs: the adaptive one settles on the depth with the
most tokens per second (batch 1 with cheap drafts: deep; a big batch whose verify cost grows with K: none; no
acceptance: none), explores little, follows changes of text and load, and ignores steps that are not steady."""

from __future__ import annotations

import random

import pytest

from service.engine.spec_policy import AdaptivePolicy, FixedPolicy, make_policy


def step_cost(batch: int, depth: int, draft: float, per_token: float) -> float:
    """A step's seconds: a fixed part, `draft` per draft depth, `per_token` per token verified."""
    return 1.0 + depth * draft + batch * (depth + 1) * per_token


def simulate(policy: AdaptivePolicy, steps: int, batch: int, acceptance: list[float], draft: float,
             per_token: float, rng: random.Random, stalls: tuple[float, float] = (0.0, 1.0)) -> list[int]:
    """Run `steps` decode steps of `batch` sequences: each verifies the last depth's drafts (accepted position by
    position with the conditional chances in `acceptance`). `stalls` (p, worst): a step is slowed by a factor
    drawn from [1, worst] with chance p, as by another process on a shared machine. Returns the depth drafted at
    each step."""
    depths, prev = [], getattr(policy, "_sim_prev", 0)
    for _ in range(steps):
        for _ in range(batch if prev else 0):
            a = 0
            while a < prev and rng.random() < acceptance[a]:
                a += 1
            policy.observe_verified(prev, a)
        depth = policy.depth(batch)
        slow = rng.uniform(1.0, stalls[1]) if stalls[0] and rng.random() < stalls[0] else 1.0
        policy.observe_step(batch, prev, depth, slow * step_cost(batch, prev, draft, per_token), True)
        depths.append(depth)
        prev = depth
    policy._sim_prev = prev
    return depths


def rate(batch: int, depth: int, acceptance: list[float], draft: float, per_token: float) -> float:
    """True tokens per second per sequence at `depth`."""
    tokens, run = 1.0, 1.0
    for a in acceptance[:depth]:
        run *= a
        tokens += run
    return tokens / step_cost(batch, depth, draft, per_token)


def best_depth(batch: int, acceptance: list[float], draft: float, per_token: float, k: int) -> int:
    return max(range(k + 1), key=lambda d: rate(batch, d, acceptance, draft, per_token))


def efficiency(depths: list[int], batch: int, acceptance: list[float], draft: float, per_token: float) -> float:
    """Tokens per second of the depths chosen, over the best depth's (expected values)."""
    best = max(rate(batch, d, acceptance, draft, per_token) for d in range(4))
    tokens = sum(rate(batch, d, acceptance, draft, per_token) * step_cost(batch, d, draft, per_token) for d in depths)
    seconds = sum(step_cost(batch, d, draft, per_token) for d in depths)
    return tokens / seconds / best


@pytest.mark.parametrize(("batch", "acceptance", "draft", "per_token"), [
    (1, [0.9, 0.85, 0.8], 0.05, 0.01),  # GPU-like: cheap drafts and verify, good acceptance -> deep
    (1, [0.75, 0.45, 0.35], 0.4, 0.03),  # the shipped model on a CPU at batch 1 -> shallow
    (32, [0.75, 0.45, 0.35], 0.4, 0.1),  # a big batch whose verify cost grows with K -> none
    (1, [0.0, 0.0, 0.0], 0.05, 0.01),  # a random MTP layer -> none
])
def test_settles_on_the_fastest_depth(batch, acceptance, draft, per_token):
    want = best_depth(batch, acceptance, draft, per_token, 3)
    policy = AdaptivePolicy(3)
    depths = simulate(policy, 600, batch, acceptance, draft, per_token, random.Random(0))
    tail = depths[100:]
    assert max(set(tail), key=tail.count) == want, (want, {d: tail.count(d) for d in set(tail)})
    assert tail.count(want) / len(tail) > 0.9  # exploration and refreshes stay rare
    assert efficiency(depths, batch, acceptance, draft, per_token) > 0.97  # warm-up included


def test_cases_cover_every_depth_choice():
    """The parametrized cases above are not all the same answer (so the test can tell policies apart)."""
    wants = {best_depth(1, [0.9, 0.85, 0.8], 0.05, 0.01, 3), best_depth(1, [0.75, 0.45, 0.35], 0.4, 0.03, 3),
             best_depth(32, [0.75, 0.45, 0.35], 0.4, 0.1, 3)}
    assert wants == {3, 1, 0}


def test_follows_a_change_of_text():
    policy = AdaptivePolicy(3)
    rng = random.Random(1)
    early = simulate(policy, 300, 1, [0.9, 0.85, 0.8], 0.05, 0.01, rng)[100:]
    assert sum(d >= 2 for d in early) / len(early) > 0.9
    late = simulate(policy, 200, 1, [0.0, 0.0, 0.0], 0.05, 0.01, rng)  # acceptance collapses
    assert late[100:].count(0) / len(late[100:]) > 0.95
    assert efficiency(late, 1, [0.0, 0.0, 0.0], 0.05, 0.01) > 0.9  # the switch included


def test_batch_buckets_are_measured_apart():
    policy = AdaptivePolicy(3)
    rng = random.Random(2)
    acc = [0.75, 0.45, 0.35]
    simulate(policy, 300, 1, acc, 0.4, 0.03, rng)
    big = simulate(policy, 300, 32, acc, 0.4, 0.1, rng)[100:]
    small = simulate(policy, 300, 1, acc, 0.4, 0.03, rng)[100:]
    assert big.count(0) / len(big) > 0.95 and small.count(1) / len(small) > 0.9


def test_only_steady_decode_steps_are_timed():
    policy = AdaptivePolicy(2, min_samples=1)
    policy.observe_step(4, 0, 1, 5.0, True)  # verified 0, drafted 1: a switch, not depth 1's cost
    policy.observe_step(4, 1, 1, 5.0, False)  # a prefill rode along
    policy.observe_step(0, 1, 1, 5.0, True)
    assert policy.score(AdaptivePolicy.bucket_of(4), 1) is None
    policy.observe_step(4, 1, 1, 2.0, True)
    assert policy.score(AdaptivePolicy.bucket_of(4), 1) == pytest.approx(policy.expected_tokens(1, 1.0) / 2.0)


def test_acceptance_estimate_and_expected_tokens():
    policy = AdaptivePolicy(3, prior_acceptance=0.5)
    assert policy.expected_tokens(0) == 1.0
    for _ in range(100):
        for _ in range(4):
            policy.observe_verified(3, 3)  # every draft accepted
        policy.observe_step(4, 3, 3, 1.0, True)
    assert policy.expected_tokens(3) == pytest.approx(4.0, abs=0.1)  # the prior keeps a little weight
    for _ in range(100):
        policy.observe_step(4, 0, 0, 1.0, True)  # steps without drafts forget nothing
    assert policy.expected_tokens(3) == pytest.approx(4.0, abs=0.1)
    for _ in range(100):
        for _ in range(4):
            policy.observe_verified(3, 0)  # position 0 rejected: positions 1, 2 not tried
        policy.observe_step(4, 3, 3, 1.0, True)
    a = policy.acceptance()
    assert a[0] < 0.05 and a[1] > 0.9  # conditional: position 1 only counts when position 0 passed


def test_fixed_and_factory():
    assert FixedPolicy(2).depth(1) == FixedPolicy(2).depth(256) == 2
    assert isinstance(make_policy("adaptive", 3), AdaptivePolicy) and make_policy("fixed", 1).depth(8) == 1
    with pytest.raises(ValueError, match="adaptive or fixed"):
        make_policy("sometimes", 2)
    assert AdaptivePolicy(2).depth(0) == 0


def test_climb_skips_a_depth_its_cost_trend_rules_out():
    """Depth 1 pays, and extrapolating the cost of depths 0 and 1 shows depth 2 cannot: depth 2 runs only in the
    refresh probes (two steps in 50), depth 3 never."""
    acc, draft, per_token = [0.5, 0.3, 0.2], 0.3, 0.02
    assert best_depth(8, acc, draft, per_token, 3) == 1
    policy = AdaptivePolicy(3, refresh_every=50)
    depths = simulate(policy, 300, 8, acc, draft, per_token, random.Random(3))
    assert depths.count(3) == 0 and depths.count(2) <= 2 * 300 // 50
    assert depths[100:].count(1) / 200 > 0.9


def test_one_slow_step_does_not_flip_the_choice():
    """A step slowed by something else on the machine (10x) moves the median of the last steps little."""
    policy = AdaptivePolicy(1)
    for _ in range(3):
        policy.observe_step(1, 0, 0, 1.0, True)
    for _ in range(5):
        policy.observe_verified(1, 1)
        policy.observe_step(1, 1, 1, 1.3, True)
    key = AdaptivePolicy.bucket_of(1)
    assert policy.best(key) == (1, None)
    policy.observe_verified(1, 1)
    policy.observe_step(1, 1, 1, 13.0, True)
    assert policy.best(key) == (1, None)


def test_no_drafts_without_fresh_evidence():
    """When no step can be timed for long (a prefill rides along in every step), the policy stops drafting, and
    resumes once steady steps are timed again."""
    policy = AdaptivePolicy(2, refresh_every=10)
    simulate(policy, 100, 1, [0.9, 0.85], 0.05, 0.01, random.Random(4))
    assert policy.depth(1) > 0
    for _ in range(30):
        d = policy.depth(1)
        policy.observe_step(1, d, d, 1.0, False)  # mixed steps only: not timed
    assert policy.depth(1) == 0
    simulate(policy, 20, 1, [0.9, 0.85], 0.05, 0.01, random.Random(5))
    assert policy.depth(1) > 0


def test_a_load_spike_does_not_leave_stale_times():
    """Depths timed while another process slowed the machine must not keep those times once it is gone. A big
    batch where drafting never pays: depth 0 is timed during a 10x spike, depth 1 during its 3x tail, depth 2
    after it, so depth 2 looks best at first. The policy must be back at depth 0 within a few hundred steps
    (refreshing only the best's neighbours, depth 0 went unre-timed while depth 2 was the best, and a window of
    stale times outvoted the fresh ones)."""
    acc, draft, per_token = [0.75, 0.45], 0.4, 0.1
    assert best_depth(32, acc, draft, per_token, 2) == 0
    policy = AdaptivePolicy(2)
    for depth, slowdown in ((0, 10.0), (1, 3.0)):
        for _ in range(8):
            policy.depth(32)
            policy.observe_step(32, depth, depth, slowdown * step_cost(32, depth, draft, per_token), True)
    late = simulate(policy, 500, 32, acc, draft, per_token, random.Random(6))
    assert late[-200:].count(0) / 200 > 0.9, "".join(map(str, late))
    key = AdaptivePolicy.bucket_of(32)
    assert policy.score(key, 0) == pytest.approx(1.0 / step_cost(32, 0, draft, per_token))


@pytest.mark.parametrize(("batch", "acceptance", "draft", "per_token"), [
    (32, [0.75, 0.45], 0.4, 0.1),  # drafting never pays
    (1, [0.9, 0.85], 0.05, 0.01),  # depth 2 pays
])
def test_stalls_of_a_shared_machine_do_not_mislead_the_choice(batch, acceptance, draft, per_token):
    """A fifth of the steps slowed up to 6x at random (measured: the policy's times at batch 1 ran 1.1-2.5x the
    steady ones on a busy VM). A stall only ever adds time, so a depth's cost is the least of its recent step
    times; with their median the policy reached 0.79x of the best depth's rate at batch 1 here."""
    effs = []
    for seed in range(5):
        policy = AdaptivePolicy(2)
        depths = simulate(policy, 800, batch, acceptance, draft, per_token, random.Random(seed), stalls=(0.2, 6.0))
        effs.append(efficiency(depths[200:], batch, acceptance, draft, per_token))
    assert sum(effs) / len(effs) > 0.97, effs
