"""Prefix caching through the real engine: the same outputs with caching on and off (greedy tokens, logprobs
within 1e-5 in fp32) and equal to transformers, with hits really taken. Requests run in waves: a wave starts
once the one before has finished, so later waves find the earlier waves' blocks in the cache.

CPU float32, the tiny random checkpoint of engine_fixtures (block size 4, index_topk 8: every prompt here is in
the sparse regime)."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import accumulate, assert_no_leaks, greedy, hf_greedy, make_engine, prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 8
SYSTEM = prompts(1, [22], seed=7)[0]  # 5 full blocks of 4 and 2 tokens: the shared prefix ends mid-block
TAILS = prompts(6, [2, 3, 6, 11, 2, 17], seed=8)  # SYSTEM + TAILS[0] is 6 full blocks
OTHER = prompts(2, [13, 9], seed=9)


def run_waves(engine, waves: list[list[tuple[str, list[int], SamplingParams]]]) -> tuple[dict, dict[str, int]]:
    """Each wave's requests added together and run to completion; returns (choices, cached tokens per request)."""
    results: dict = {}
    cached: dict[str, int] = {}
    for wave in waves:
        for rid, prompt, params in wave:
            engine.add_request(rid, prompt, params)
        for _ in range(10_000):
            if not engine.has_unfinished():
                break
            outs = engine.step()
            accumulate(results, outs)
            for out in outs:
                cached[out.request_id] = out.num_cached_tokens
        assert not engine.has_unfinished()
    return results, cached


def assert_same(on: dict, off: dict) -> None:
    assert on.keys() == off.keys()
    for rid in on:
        for i, c in on[rid].items():
            d = off[rid][i]
            assert c.token_ids == d.token_ids, f"{rid}#{i}"
            assert len(c.logprobs) == len(d.logprobs)
            for a, b in zip(c.logprobs, d.logprobs, strict=True):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-5, f"{rid}#{i}"
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
                assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a.top, b.top, strict=True))


def both(engine_ckpt, waves, **settings) -> tuple[dict, dict, object]:
    """Run `waves` with caching off and on; returns (on results, cached tokens with caching on, the on engine)."""
    off_engine = make_engine(engine_ckpt, enable_prefix_caching=False, **settings)
    off, off_cached = run_waves(off_engine, waves)
    assert set(off_cached.values()) == {0} and off_engine.stats().prefix_cache_queries == 0
    engine = make_engine(engine_ckpt, **settings)
    on, cached = run_waves(engine, waves)
    assert_same(on, off)
    assert_no_leaks(engine)
    assert engine.block_manager.pool.consistency_errors() == []
    # Idle: blocks still cached, but none in use (kv_cache_usage_perc counts only held blocks).
    assert engine.block_manager.pool.num_cached > 0 and engine.stats().kv_cache_usage == 0
    return on, cached, engine


@pytest.mark.parametrize("budget", [2048, 7])  # one step per wave, or chunked prefill
def test_shared_system_prompt_in_a_mixed_batch(engine_ckpt, hf_oracle, budget) -> None:
    lp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    first = SYSTEM + TAILS[0]
    wave2 = [(f"s{i}", SYSTEM + t, lp) for i, t in enumerate(TAILS[1:])]
    wave2 += [("other", OTHER[0], lp), ("exact", list(first), lp), ("aligned", SYSTEM[:20], lp)]
    on, cached, engine = both(engine_ckpt, [[("first", first, lp)], wave2], max_num_batched_tokens=budget)
    # 5 full blocks of the system prompt; an exactly cached prompt computes only its last token.
    assert cached == {"first": 0, **{f"s{i}": 20 for i in range(5)}, "other": 0, "exact": len(first) - 1,
                      "aligned": 19}
    stats = engine.stats()
    assert stats.prefix_cache_hits == sum(cached.values())
    assert stats.prefix_cache_queries == len(first) + sum(len(p) for _, p, _ in wave2)
    for rid, prompt, _ in [("first", first, None), *wave2]:
        assert on[rid][0].token_ids == hf_greedy(hf_oracle, prompt, MAX_TOKENS), rid


def test_n_greater_than_one_with_seeded_sampling(engine_ckpt) -> None:
    params = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    waves = [[("a", SYSTEM + TAILS[1], params)],
             [("b", SYSTEM + TAILS[1], params), ("c", SYSTEM + TAILS[2], params), ("d", SYSTEM[:12], params)]]
    on, cached, _ = both(engine_ckpt, waves)
    assert all(len(on[r]) == 3 for r in "abcd")
    assert cached == {"a": 0, "b": len(SYSTEM + TAILS[1]) - 1, "c": 20, "d": 11}


def test_preemption_under_a_small_cache(engine_ckpt, hf_oracle) -> None:
    # 20 blocks of 4 tokens for six ~30-token requests: they cannot all run at once.
    reqs = [(f"p{i}", SYSTEM + t, greedy(12)) for i, t in enumerate(TAILS)]
    on, cached, engine = both(engine_ckpt, [reqs[:2], reqs[2:]], kv_cache_tokens=80)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hits > 0
    for rid, prompt, _ in reqs:
        assert on[rid][0].token_ids == hf_greedy(hf_oracle, prompt, 12), rid


def test_a_cache_too_small_for_every_prefix_evicts_without_error_or_leak(engine_ckpt, hf_oracle) -> None:
    many = prompts(12, [9, 14, 21], seed=3)
    # 16 blocks; each wave needs ~15 and begins with the previous wave's last prompt (a hit, if still cached).
    waves = [[(f"w{w}r{i}", many[(2 * w + i) % 12], greedy(4)) for i in range(3)] for w in range(8)]
    on, cached, engine = both(engine_ckpt, waves, kv_cache_tokens=64)
    assert engine.block_manager.pool.num_evictions > 0 and any(cached.values())
    for wave in waves:
        for rid, prompt, _ in wave:
            assert on[rid][0].token_ids == hf_greedy(hf_oracle, prompt, 4), rid


def test_cache_salt_keeps_tenants_apart(engine_ckpt) -> None:
    engine = make_engine(engine_ckpt)
    prompt = SYSTEM + TAILS[3]

    def salted(salt):
        return SamplingParams(temperature=0.0, max_tokens=2, cache_salt=salt)

    _, cached = run_waves(engine, [[("a1", prompt, salted("tenant-a"))], [("b1", prompt, salted("tenant-b"))],
                                   [("none", prompt, salted(None))], [("a2", prompt, salted("tenant-a"))],
                                   [("b2", prompt, salted("tenant-b"))]])
    assert cached == {"a1": 0, "b1": 0, "none": 0, "a2": len(prompt) - 1, "b2": len(prompt) - 1}
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_speculative_decoding_reuses_only_valid_mtp_entries(engine_ckpt, hf_oracle, draft_inputs) -> None:
    """K = 2, greedy. The MTP layer's state reads its own cache, so a stale or missing MTP entry in a reused
    block changes the drafts' input: equal inputs with caching on and off show none was reused. A check that
    ignores MTP validity is shown to change them."""
    g = greedy(MAX_TOKENS)
    waves = [[("first", SYSTEM + TAILS[0], g), ("n2", OTHER[1] + TAILS[4], SamplingParams(n=2, temperature=0.0,
                                                                                          max_tokens=3))],
             [("s1", SYSTEM + TAILS[1], g), ("exact", SYSTEM + TAILS[0], g), ("aligned", SYSTEM[:20], g),
              ("after-n2", OTHER[1] + TAILS[4] + TAILS[2], g)]]
    on, cached, engine = both(engine_ckpt, waves, num_speculative_tokens=2)
    # n>1 choices write no MTP entries: a drafting request finds nothing reusable in their blocks.
    assert cached["after-n2"] == 0 and cached["s1"] == 20 and cached["exact"] == len(SYSTEM + TAILS[0]) - 1
    assert cached["aligned"] == 19
    assert engine.stats().spec_num_drafts > 0
    for rid in ("first", "s1", "exact", "aligned", "after-n2"):
        prompt = next(p for w in waves for r, p, _ in w if r == rid)
        assert on[rid][0].token_ids == hf_greedy(hf_oracle, prompt, MAX_TOKENS), rid
    off_inputs, on_inputs = list(draft_inputs.values())
    assert on_inputs.keys() == off_inputs.keys()
    worst = max((on_inputs[k] - off_inputs[k]).abs().max().item() for k in on_inputs)
    assert worst < 1e-4

    # The same waves, with the MTP check switched off: the hits now reuse stale MTP entries.
    draft_inputs.clear()
    broken = make_engine(engine_ckpt, num_speculative_tokens=2)
    broken.block_manager.needs_mtp = lambda seq: False
    _, broken_cached = run_waves(broken, waves)
    assert broken_cached["after-n2"] > 0
    [broken_inputs] = draft_inputs.values()
    common = [k for k in broken_inputs if k in off_inputs]
    assert max((broken_inputs[k] - off_inputs[k]).abs().max().item() for k in common) > 1e-3
    assert torch.isfinite(torch.stack([broken_inputs[k] for k in common])).all()
