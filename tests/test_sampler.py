"""Sampler on known logits: each filter's exact support, penalty arithmetic, seeded draws, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from service.engine.sampler import Sampler, SamplingState, apply_penalties, argmax_rows, compute_logprobs
from service.engine.sampling_params import SamplingParams

# probabilities 0.5, 0.3, 0.15, 0.05 (sorted, so supports are easy to read)
P4 = torch.tensor([0.5, 0.3, 0.15, 0.05])
L4 = P4.log()


def state(params: list[SamplingParams], prompts: list[list[int]] | None = None,
          outputs: list[list[int]] | None = None, gens: list[torch.Generator | None] | None = None) -> SamplingState:
    n = len(params)
    return SamplingState.build(params, prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)],
                               gens or [None] * n, "cpu")


def support(probs: torch.Tensor) -> list[int]:
    return torch.nonzero(probs > 0).flatten().tolist()


@pytest.mark.parametrize(("rows", "vocab"), [(1, 8192), (4, 256), (64, 8192), (9, 1000)])
def test_argmax_rows_matches_argmax(rows: int, vocab: int) -> None:
    """The blockwise argmax picks argmax's index: first of tied maxima, NaN as the largest, all -inf -> 0."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, vocab, generator=g)
    x[0, 3] = x[0, vocab - 1] = 50.0  # a tie across blocks
    if rows > 1:
        x[1, 200 % vocab] = x[1, 7] = float("nan")
    if rows > 2:
        x[2] = float("-inf")
    if rows > 3:
        x[3, 130 % vocab] = x[3, 129 % vocab] = 50.0  # a tie inside one block
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_greedy_is_argmax_and_one_hot() -> None:
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    st = state([SamplingParams(temperature=0.0)] * 5)
    probs = Sampler().probs(logits, st)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 64).float())
    assert Sampler().sample(logits, st).token_ids == logits.argmax(-1).tolist()


def test_temperature_scales_logits() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    st = state([SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)])
    probs = Sampler().probs(logits, st)
    torch.testing.assert_close(probs[0], (logits[0] / 0.5).softmax(-1))
    torch.testing.assert_close(probs[1], (logits[1] / 2.0).softmax(-1))


@pytest.mark.parametrize(("kwargs", "kept"), [
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_p": 0.75}, [0, 1]),  # 0.5 < 0.75 needs the second; 0.8 >= 0.75 stops there
    ({"top_p": 0.81}, [0, 1, 2]),
    ({"top_p": 0.3}, [0]),  # the top token always survives
    ({"min_p": 0.35}, [0, 1]),  # threshold 0.175
    ({"min_p": 0.29}, [0, 1, 2]),  # threshold 0.145
    ({"top_k": 3, "top_p": 0.83}, [0, 1]),  # top_p on the top_k-renormalised probs (.526, .316, .158)
    ({"top_p": 0.83}, [0, 1, 2]),  # ... which differs from top_p alone
    ({"top_k": 3, "min_p": 0.2}, [0, 1, 2]),
    ({"top_p": 0.9, "min_p": 0.5}, [0, 1]),
])
def test_truncation_support_and_renormalisation(kwargs: dict, kept: list[int]) -> None:
    perm = torch.tensor([2, 0, 3, 1])  # shuffle the vocabulary so the sort/scatter back is exercised
    logits = torch.empty(4)
    logits[perm] = L4
    probs = Sampler().probs(logits[None], state([SamplingParams(**kwargs)]))[0]
    assert sorted(support(probs)) == sorted(perm[kept].tolist())
    expected = torch.zeros(4)
    expected[perm[kept]] = P4[kept] / P4[kept].sum()
    torch.testing.assert_close(probs, expected)


def test_filters_are_per_row() -> None:
    logits = L4.repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=0.75)]
    probs = Sampler().probs(logits, state(params))
    assert [support(p) for p in probs] == [[0], [0, 1, 2, 3], [0, 1]]
    torch.testing.assert_close(probs[1], P4)


def test_penalty_arithmetic() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    p = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    st = state([p], prompts=[[0, 1]], outputs=[[3, 3, 4, 3]])
    expected = torch.tensor([[
        2.0 / 2.0,  # prompt only: repetition divides a positive logit
        -1.0 * 2.0,  # prompt only: repetition multiplies a negative one
        0.5,  # never seen
        3.0 / 2.0 - 0.5 - 0.25 * 3,  # output x3: repetition, presence, frequency * count
        -2.0 * 2.0 - 0.5 - 0.25 * 1,
        1.0,
    ]])
    torch.testing.assert_close(apply_penalties(logits, st), expected)
    torch.testing.assert_close(Sampler().probs(logits, st), expected.softmax(-1))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]]))  # input untouched


def test_penalties_per_row_and_greedy_uses_penalised_logits() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0), SamplingParams(temperature=0.0)]
    st = state(params, outputs=[[0], [0]])
    # row 0: 5 - 2 = 3 < 4, so greedy moves to token 1; row 1 has no penalty
    assert Sampler().sample(logits, st).token_ids == [1, 0]


def test_presence_only_on_output_and_negative_penalty_encourages() -> None:
    logits = torch.zeros(1, 4)
    st = state([SamplingParams(presence_penalty=-1.0)], prompts=[[1]], outputs=[[2, 2]])
    torch.testing.assert_close(apply_penalties(logits, st), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def run_steps(params: list[SamplingParams], seeds: list[int | None], steps: int, vocab: int, row: int) -> list[int]:
    """Sample `steps` tokens for a batch; returns row `row`'s tokens. Logits vary per step and per row."""
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    out: list[list[int]] = [[] for _ in params]
    sampler = Sampler()
    for step in range(steps):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step)).repeat(len(params), 1)
        logits[row] = logits[row] * 0.3  # near-flat, so different noise almost surely gives different tokens
        st = SamplingState.build(params, [[1, 2, 3]] * len(params), out, gens, "cpu")
        for i, t in enumerate(sampler.sample(logits, st).token_ids):
            out[i].append(t)
    return out[row]


def test_seeded_reproducible_and_independent_of_batch() -> None:
    me = SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.1)
    alone = run_steps([me], [1234], steps=8, vocab=500, row=0)
    assert run_steps([me], [1234], steps=8, vocab=500, row=0) == alone
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(top_k=5)]
    for pos in range(4):  # our row at every position among seeded, greedy and unseeded neighbours
        batch = others[:pos] + [me] + others[pos:]
        seeds = [7, None, 99][:pos] + [1234] + [7, None, 99][pos:]
        assert run_steps(batch, seeds, steps=8, vocab=500, row=pos) == alone
    assert run_steps([me], [4321], steps=8, vocab=500, row=0) != alone  # the seed matters


def test_two_rows_same_seed_draw_the_same() -> None:
    logits = torch.zeros(2, 1000)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    st = state([SamplingParams()] * 2, gens=gens)
    a, b = Sampler().sample(logits, st).token_ids
    assert a == b


CHI2_CRIT_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_probs() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0])
    p = SamplingParams(temperature=0.8)
    target = (logits / 0.8).softmax(-1)
    n = 20000
    torch.manual_seed(0)  # unseeded rows: all drawn together from the global RNG
    st = state([p] * n)
    draws = Sampler().sample_from_probs(Sampler().probs(logits.repeat(n, 1), st), st)
    counts = torch.bincount(draws, minlength=6).float()
    assert chi2(counts, target) < CHI2_CRIT_DF5_P001
    # the same test rejects a wrong distribution, so it can fail
    assert chi2(counts, logits.softmax(-1)) > CHI2_CRIT_DF5_P001
    # a seeded row drawn step after step from its own generator
    gen = torch.Generator().manual_seed(3)
    st1 = state([p], gens=[gen])
    probs1 = Sampler().probs(logits[None], st1)
    seq = torch.stack([Sampler().sample_from_probs(probs1, st1)[0] for _ in range(4000)])
    assert chi2(torch.bincount(seq, minlength=6).float(), target) < CHI2_CRIT_DF5_P001


def test_sampled_tokens_stay_in_support() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    st = state([SamplingParams(top_k=3)] * 64)
    out = torch.tensor(Sampler().sample(logits, st).token_ids)
    top3 = logits.topk(3, dim=-1).indices
    assert bool((top3 == out[:, None]).any(-1).all())


def test_logprobs_raw_with_ordered_alternatives() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.7], [0.1, 2.0, -1.0, 1.5, 0.7], [3.0, 0.0, 0.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.5, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    out = Sampler().sample(logits, state(params, prompts=[[1], [], []]))
    raw = logits.log_softmax(-1)
    assert out.logprobs[2] is None
    lp0 = out.logprobs[0]
    assert lp0 is not None and lp0.token_id == out.token_ids[0] == 3  # penalty moved greedy from 1 to 3
    assert math.isclose(lp0.logprob, raw[0, 3].item(), rel_tol=1e-6)  # raw: before penalty
    assert [t for t, _ in lp0.top] == [1, 3, 4]
    assert [v for _, v in lp0.top] == pytest.approx(raw[0, [1, 3, 4]].tolist(), rel=1e-6)
    lp1 = out.logprobs[1]
    assert lp1 is not None and lp1.top == [] and lp1.token_id == out.token_ids[1]
    assert math.isclose(lp1.logprob, raw[1, out.token_ids[1]].item(), rel_tol=1e-6)  # before temperature


def test_compute_logprobs() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    res = compute_logprobs(logits, [0, 2], k=2)
    raw = logits.log_softmax(-1)
    assert [r.token_id for r in res] == [0, 2]
    assert res[0].logprob == pytest.approx(raw[0, 0].item())
    assert [t for t, _ in res[0].top] == [1, 2] and [t for t, _ in res[1].top] == [2, 0]
    assert res[0].top[0][1] >= res[0].top[1][1]


def test_uniform_per_row_generators() -> None:
    st = state([SamplingParams()] * 2, gens=[torch.Generator().manual_seed(8), None])
    u = Sampler().uniform(st, 4)
    assert u.shape == (2, 4) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u[0], torch.rand(4, generator=torch.Generator().manual_seed(8)))
