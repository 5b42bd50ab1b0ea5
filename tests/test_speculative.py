"""MTP speculative decoding is lossless: greedy tokens equal plain decoding for K = 1..3 (batched, past
index_topk, under preemption), drafts follow the reference recursion, and sampled outputs keep the plain
distribution (a chi-square test that a broken acceptance rule fails)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.batch import ForwardBatch
from model.tokenizer import Tokenizer
from service.engine import speculative
from service.engine.sampler import Sampler, SamplingState
from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import OracleDrafts, assert_no_leaks, greedy, make_engine, prompts, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 14
SHIPPED = Path(__file__).parents[1] / "model/weights/glm-5-tiny-py"
PROMPTS = prompts(8, [3, 9, 17, 30, 41, 5, 12, 24], seed=3)  # index_topk is 8


def run(engine, params_list) -> list[list[int]]:
    for i, (p, params) in enumerate(zip(PROMPTS, params_list, strict=False)):
        engine.add_request(str(i), p, params)
    res = run_engine(engine)
    assert_no_leaks(engine)
    return [res[str(i)][0].token_ids for i in range(len(res))]


@pytest.fixture(scope="module")
def plain(engine_ckpt) -> list[list[int]]:
    return run(make_engine(engine_ckpt), [greedy(MAX_TOKENS)] * len(PROMPTS))


# -- verify() on known distributions -------------------------------------------------------------------------------
def one_hot(ids: list[int], V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), V).float()


def test_verify_greedy_accepts_longest_matching_prefix():
    V = 5
    p = one_hot([1, 2, 3, 4], V)[None]  # target argmaxes at 4 positions (K = 3)
    for drafts, accepted, final in [([1, 2, 3], 3, 4), ([1, 0, 3], 1, 2), ([0, 2, 3], 0, 1), ([1, 2, 0], 2, 3)]:
        q = one_hot(drafts, V)[None]
        v = speculative.verify(p, q, torch.tensor([drafts]), torch.tensor([3]), torch.ones(1, 3),
                               torch.tensor([True]))
        assert int(v.num_accepted) == accepted
        assert int(v.final_probs.argmax()) == final and float(v.final_probs.max()) == 1.0
    # Fewer real drafts than K: padding is never accepted, the bonus comes right after the last real one.
    v = speculative.verify(p, one_hot([1, 2, 3], V)[None], torch.tensor([[1, 2, -1]]), torch.tensor([2]),
                           torch.ones(1, 3), torch.tensor([True]))
    assert int(v.num_accepted) == 2 and int(v.final_probs.argmax()) == 3


def test_verify_sampled_acceptance_and_residual():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])  # K = 1
    q = torch.tensor([[[0.25, 0.75, 0.0]]])
    # Draft 1: accept iff u < p/q = 2/3; on rejection the residual is norm(max(0, p - q)) = [1, 0, 0].
    for u, accepted in [(0.6, 1), (0.7, 0)]:
        v = speculative.verify(p, q, torch.tensor([[1]]), torch.tensor([1]), torch.tensor([[u]]),
                               torch.tensor([False]))
        assert int(v.num_accepted) == accepted
        want = p[0, 1] if accepted else torch.tensor([1.0, 0.0, 0.0])
        assert torch.allclose(v.final_probs[0], want)


# -- greedy: identical tokens -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identical_to_plain_in_a_batch(engine_ckpt, plain, k):
    engine = make_engine(engine_ckpt, num_speculative_tokens=k)
    assert run(engine, [greedy(MAX_TOKENS)] * len(PROMPTS)) == plain
    stats = engine.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_draft_tokens >= stats.spec_num_drafts
    assert len(stats.spec_accepted_per_pos) == k


@pytest.mark.parametrize("k", [2])
def test_greedy_with_penalties_in_a_mixed_batch(engine_ckpt, plain, k):
    """Plain greedy rows take the argmax fast path; greedy rows with penalties take the full rejection path; in
    one batch both stay identical to plain decoding with the same parameters."""
    mixed = [greedy(MAX_TOKENS, repetition_penalty=1.3) if i % 2 else greedy(MAX_TOKENS) for i in range(len(PROMPTS))]
    want = run(make_engine(engine_ckpt), mixed)
    assert [w for i, w in enumerate(want) if i % 2 == 0] == [p for i, p in enumerate(plain) if i % 2 == 0]
    assert run(make_engine(engine_ckpt, num_speculative_tokens=k), mixed) == want


def test_verify_greedy_rows_ignore_q():
    """Greedy drafts carry no q (zeros in `draft_tensors`); the verdict equals the one with one-hot q."""
    V = 6
    p = one_hot([1, 2, 3], V)[None]
    for drafts in ([1, 2], [1, 5], [4, 2]):
        with_q = speculative.verify(p, one_hot(drafts, V)[None], torch.tensor([drafts]), torch.tensor([2]),
                                    torch.ones(1, 2), torch.tensor([True]))
        no_q = speculative.verify(p, torch.zeros(1, 2, V), torch.tensor([drafts]), torch.tensor([2]),
                                  torch.ones(1, 2), torch.tensor([True]))
        assert int(with_q.num_accepted) == int(no_q.num_accepted)
        assert torch.equal(with_q.final_probs, no_q.final_probs)


@pytest.mark.parametrize("cache_tokens", [4096, 96])  # 96 tokens cannot hold 8 sequences: preemption
def test_accepted_drafts_at_every_position_keep_tokens_identical(engine_ckpt, plain, monkeypatch, cache_tokens):
    OracleDrafts.truth = {str(i): t for i, t in enumerate(plain)}
    from service.engine import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MTPProposer", OracleDrafts)
    engine = make_engine(engine_ckpt, num_speculative_tokens=3, kv_cache_tokens=cache_tokens)
    assert run(engine, [greedy(MAX_TOKENS)] * len(PROMPTS)) == plain
    stats = engine.stats()
    assert all(n > 0 for n in stats.spec_accepted_per_pos), stats.spec_accepted_per_pos
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # some rejected too
    if cache_tokens == 96:
        assert stats.num_preemptions > 0


def reference_drafts(model, ids: list[int], k: int) -> list[int]:
    """The K greedy drafts after `ids` (its last token just sampled), by the MTP layer applied recursively and
    cache-free: step 1 on (h_{P-1}, t_P), step k on (previous normed output, previous draft)."""
    ids = torch.tensor(ids)
    with torch.inference_mode():
        hs = model(ids[:-1], ForwardBatch.single(len(ids) - 1))  # h_0 .. h_{P-1}
        toks = ids[1:]  # t_1 .. t_P
        out = model.mtp(toks, hs, ForwardBatch.single(len(toks)))
        want = []
        for _ in range(k):
            d = int(model.mtp_logits(out[-1]).argmax())
            want.append(d)
            hs = torch.cat([hs, out[-1:]])  # the next position reads the previous step's (normed) output
            toks = torch.cat([toks, torch.tensor([d])])
            out = model.mtp(toks, hs, ForwardBatch.single(len(toks)))
    return want


@pytest.mark.parametrize("which", ["random", "shipped"])
def test_drafts_follow_the_reference_recursion(engine_ckpt, which):
    """After the prefill and after each verify step (the accepted positions caught up, then the first draft from
    the last one), the drafts equal the reference recursion. The shipped (trained) model accepts drafts, so its
    verify steps catch up several rows at once."""
    if which == "shipped":
        path = SHIPPED
        prompt = Tokenizer.from_dir(path).encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    else:
        path, prompt = engine_ckpt, PROMPTS[3]  # 30 tokens, past index_topk
    engine = make_engine(path, num_speculative_tokens=3)
    engine.add_request("r", prompt, greedy(24))
    seq = engine.requests["r"].seqs[0]
    rows = []
    for _ in range(6):
        before = seq.num_computed_tokens
        engine.step()  # samples, catches the MTP cache up, drafts
        rows.append(seq.num_computed_tokens - before)
        assert seq.draft_token_ids == reference_drafts(engine.model, prompt + seq.output_token_ids, 3)
    assert rows[0] == len(prompt) and max(rows[1:]) <= 4
    if which == "shipped":
        assert max(rows[1:]) > 1, rows


def test_stops_and_max_tokens_never_overshoot(engine_ckpt, plain, monkeypatch):
    OracleDrafts.truth = {str(i): t for i, t in enumerate(plain)}
    from service.engine import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MTPProposer", OracleDrafts)
    engine = make_engine(engine_ckpt, num_speculative_tokens=3)
    stop_id = plain[0][5]
    params = [greedy(MAX_TOKENS, stop_token_ids=[stop_id]), greedy(4), greedy(1)]
    for i, p in enumerate(params):
        engine.add_request(str(i), PROMPTS[i], p)
    res = run_engine(engine)
    cut = plain[0].index(stop_id) + 1
    assert res["0"][0].token_ids == plain[0][:cut] and res["0"][0].finish_reason == "stop"
    assert res["1"][0].token_ids == plain[1][:4] and res["2"][0].token_ids == plain[2][:1]
    assert_no_leaks(engine)


def test_logprobs_equal_plain(engine_ckpt):
    def go(k):
        engine = make_engine(engine_ckpt, num_speculative_tokens=k)
        engine.add_request("a", PROMPTS[2], greedy(6, logprobs=3))
        return run_engine(engine)["a"][0].logprobs

    a, b = go(0), go(2)
    assert [x.token_id for x in a] == [x.token_id for x in b]
    assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b, strict=True))
    assert all([t for t, _ in x.top] == [t for t, _ in y.top] for x, y in zip(a, b, strict=True))


# -- sampled: the distribution is that of plain decoding ----------------------------------------------------------
def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_second_token_distribution(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t2) = sum_t1 P(t1 | prompt) P(t2 | prompt, t1) under the processed (plain) sampling distribution."""
    sampler = Sampler()
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        h = model(ids, ForwardBatch.single(len(ids)))
        st = SamplingState.build([params], [prompt], [[]], [None], "cpu")
        p1 = sampler.probs(model.logits(h[-1:]), st)[0]
        support = (p1 > 0).nonzero().flatten().tolist()
        batch = torch.tensor([prompt + [t] for t in support])
        n = batch.shape[1]
        fb = ForwardBatch(torch.arange(n).repeat(len(support)), [n] * len(support), [n] * len(support))
        last = model(batch.flatten(), fb).view(len(support), n, -1)[:, -1]
        st2 = SamplingState.build([params] * len(support), [prompt] * len(support), [[t] for t in support],
                                  [None] * len(support), "cpu")
        p2 = sampler.probs(model.logits(last), st2)
    return (p1[support, None] * p2).sum(0)


def sample_second_tokens(engine, prompt: list[int], params: SamplingParams, n: int) -> torch.Tensor:
    for i in range(n):
        engine.add_request(str(i), prompt, SamplingParams(**{**params.__dict__, "seed": 1000 + i}))
    res = run_engine(engine)
    return torch.tensor([res[str(i)][0].token_ids[1] for i in range(n)])


def chi2(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Goodness of fit; bins with expected count < 5 are pooled."""
    n = len(samples)
    observed = torch.bincount(samples, minlength=len(probs)).float()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def always_accept(p, q, drafts, num_drafts, u, greedy):
    """A deliberately broken rule: every draft passes."""
    return speculative.Verdict(num_drafts.clone(), p[torch.arange(len(p)), num_drafts])


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_distribution_matches_plain_and_broken_rule_fails(engine_ckpt, monkeypatch, top_p):
    params = SamplingParams(temperature=1.0, top_p=top_p, max_tokens=4, ignore_eos=True)  # 2 drafts after t1
    engine = make_engine(engine_ckpt, num_speculative_tokens=2, max_num_seqs=256)
    prompt = PROMPTS[1]
    exact = exact_second_token_distribution(engine.model, prompt, params)
    n = 1500
    stat, df = chi2(sample_second_tokens(engine, prompt, params, n), exact)
    assert stat < chi2_critical(df), (stat, df)
    assert engine.stats().spec_num_accepted_tokens > 0  # the acceptance path was exercised
    monkeypatch.setattr(speculative, "verify", always_accept)
    broken = make_engine(engine_ckpt, num_speculative_tokens=2, max_num_seqs=256)
    stat_b, df_b = chi2(sample_second_tokens(broken, prompt, params, n), exact)
    assert stat_b > chi2_critical(df_b), (stat_b, df_b)
