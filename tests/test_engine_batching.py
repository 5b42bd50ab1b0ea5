"""Continuous batching keeps every request's output what it would be alone: against transformers' greedy generate,
under chunked prefill, preemption, aborts, n>1 forks and seeded sampling. CPU float32, tiny random checkpoint."""

from __future__ import annotations

import pytest

from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import accumulate, assert_no_leaks, greedy, hf_greedy, make_engine, prompts, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 12
# index_topk is 8: most prompts are past it at once, the short ones cross it while decoding.
PROMPTS = prompts(16, [3, 9, 17, 30, 41, 5, 12, 24])


@pytest.fixture(scope="module")
def reference(hf_oracle) -> list[list[int]]:
    return [hf_greedy(hf_oracle, p, MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(engine_ckpt) -> list[list[int]]:
    """Each prompt through the engine with nothing else in the batch."""
    engine = make_engine(engine_ckpt)
    out = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
        out.append(run_engine(engine)[str(i)][0].token_ids)
    return out


def add_all(engine, indices, params=None) -> None:
    for i in indices:
        engine.add_request(str(i), PROMPTS[i], params or greedy(MAX_TOKENS))


def test_alone_matches_transformers(alone, reference) -> None:
    assert alone == reference


def test_sixteen_concurrent_requests_match_alone(engine_ckpt, alone) -> None:
    engine = make_engine(engine_ckpt)
    add_all(engine, range(16))
    sizes = []
    engine.fault_injector = lambda sched: sizes.append(len(sched.scheduled))
    results = run_engine(engine)
    assert max(sizes) == 16  # really one batch
    assert [results[str(i)][0].token_ids for i in range(16)] == alone
    assert all(results[str(i)][0].finish_reason == "length" for i in range(16))
    assert_no_leaks(engine)


def test_chunked_prefill_matches_whole_prefill(engine_ckpt, alone) -> None:
    engine = make_engine(engine_ckpt, max_num_batched_tokens=7)
    indices = [3, 4, 7, 1]  # 30, 41, 24, 9 tokens: every prompt but the last takes several steps
    add_all(engine, indices)
    chunks = []
    engine.fault_injector = lambda sched: chunks.append([(s.num_uncomputed_tokens, n) for s, n in sched.scheduled])
    results = run_engine(engine)
    assert all(sum(n for _, n in step) <= 7 for step in chunks)
    assert any(n < left for step in chunks for left, n in step), "no prompt was split"
    assert [results[str(i)][0].token_ids for i in indices] == [alone[i] for i in indices]
    assert_no_leaks(engine)


def test_preemption_with_a_small_cache(engine_ckpt, alone) -> None:
    # 14 blocks of 4 = 56 tokens for 8 requests of up to 24 + 12 tokens each, plus a seeded and an n=3 request.
    engine = make_engine(engine_ckpt, kv_cache_tokens=56)
    indices = [0, 1, 2, 5, 6, 7, 8, 13]
    add_all(engine, indices)
    sampled = SamplingParams(temperature=1.0, top_k=40, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("seeded", PROMPTS[9], sampled)
    engine.add_request("n3", PROMPTS[10], greedy(MAX_TOKENS, n=3))
    results = run_engine(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [results[str(i)][0].token_ids for i in indices] == [alone[i] for i in indices]
    assert [c.token_ids for c in results["n3"].values()] == [alone[10]] * 3
    assert_no_leaks(engine)

    quiet = make_engine(engine_ckpt)  # the seeded request, never preempted
    quiet.add_request("seeded", PROMPTS[9], sampled)
    assert run_engine(quiet)["seeded"][0].token_ids == results["seeded"][0].token_ids


def test_abort_half_mid_generation(engine_ckpt, alone) -> None:
    engine = make_engine(engine_ckpt, max_num_seqs=6)  # some requests are still waiting when the aborts come
    add_all(engine, range(12))
    results: dict = {}
    for _ in range(4):
        accumulate(results, engine.step())
    assert engine.scheduler.waiting and engine.block_manager.usage > 0
    for i in range(0, 12, 2):
        assert engine.abort_request(str(i))
    assert not engine.abort_request("no-such-request")
    while engine.has_unfinished():
        accumulate(results, engine.step())
    for i in range(12):
        choice = results[str(i)][0]
        if i % 2:
            assert choice.token_ids == alone[i] and choice.finish_reason == "length"
        else:
            assert choice.finish_reason == "abort" and choice.token_ids == alone[i][: len(choice.token_ids)]
            assert len(choice.token_ids) < MAX_TOKENS
    assert_no_leaks(engine)


def test_n_choices_share_one_prefill(engine_ckpt, alone) -> None:
    engine = make_engine(engine_ckpt)
    prompt = PROMPTS[4]  # 41 tokens: not a multiple of the block size, so the fork copies a partial block
    assert len(prompt) % 4
    prefill_tokens = []

    def count(sched) -> None:
        prefill_tokens.extend(max(0, min(s.num_computed_tokens + n, len(prompt)) - s.num_computed_tokens)
                              for s, n in sched.scheduled)

    engine.fault_injector = count
    engine.add_request("n4", prompt, greedy(MAX_TOKENS, n=4))
    results = run_engine(engine)
    assert sorted(results["n4"]) == [0, 1, 2, 3]
    assert all(c.token_ids == alone[4] and c.finish_reason == "length" for c in results["n4"].values())
    assert sum(prefill_tokens) == len(prompt)  # the prompt was computed once, not four times
    assert_no_leaks(engine)


def sample_params(seed: int | None, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=1.5, top_p=0.95, seed=seed, n=n, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_seeded_sampling_is_reproducible_and_batch_independent(engine_ckpt) -> None:
    engine = make_engine(engine_ckpt)

    def alone_run(seed: int) -> list[int]:
        engine.add_request("s", PROMPTS[2], sample_params(seed))
        return run_engine(engine)["s"][0].token_ids

    first = [alone_run(seed) for seed in (7, 8, 9)]
    assert alone_run(7) == first[0]
    assert len({tuple(t) for t in first}) == 3  # the seed matters

    # In a crowd of unseeded, greedy and other-seeded requests, with chunked prefill: the same tokens.
    crowded = make_engine(engine_ckpt, max_num_batched_tokens=16)
    for i in range(6):
        crowded.add_request(f"other{i}", PROMPTS[i], sample_params(None) if i % 2 else greedy(MAX_TOKENS))
    crowded.add_request("s", PROMPTS[2], sample_params(7))
    crowded.add_request("seed100", PROMPTS[3], sample_params(100))
    # n=3 with seed 7: choice i draws from seed 7 + i, exactly as three single requests would.
    crowded.add_request("n3", PROMPTS[2], sample_params(7, n=3))
    results = run_engine(crowded)
    assert results["s"][0].token_ids == first[0]
    assert [results["n3"][i].token_ids for i in range(3)] == first
    assert_no_leaks(crowded)
