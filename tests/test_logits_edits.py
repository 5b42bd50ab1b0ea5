"""logit_bias, allowed_token_ids and bad_words: in the sampler (greedy and sampled rows), and through the engine
with and without MTP speculative decoding (drafts and verification see the same edited distribution, so greedy
tokens stay identical), and grammar-constrained requests batched beside free ones."""

from __future__ import annotations

import torch

from service.engine.sampler import Sampler, SamplingState
from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import assert_no_leaks, make_engine, prompts, run_engine

V = 16


def _probs(params: list[SamplingParams], outputs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    state = SamplingState.build(params, [[1]] * len(params), outputs, [None] * len(params), "cpu")
    return Sampler().probs(logits, state)


def test_logit_bias_moves_the_argmax_and_the_distribution() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 1.0
    p = _probs([SamplingParams(temperature=0.0, logit_bias={7: 5.0}),
                SamplingParams(temperature=1.0, logit_bias={3: -100.0})], [[], []], logits)
    assert p[0].argmax() == 7 and p[0, 7] == 1.0
    assert p[1, 3] < 1e-30 and torch.allclose(p[1].sum(), torch.tensor(1.0))


def test_allowed_token_ids_limit_the_support() -> None:
    logits = torch.randn(2, V)
    p = _probs([SamplingParams(temperature=1.0, allowed_token_ids=[2, 5]),
                SamplingParams(temperature=0.0, allowed_token_ids=[9])], [[], []], logits)
    assert set(torch.nonzero(p[0]).flatten().tolist()) <= {2, 5}
    assert p[1].argmax() == 9


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix() -> None:
    logits = torch.zeros(3, V)
    logits[:, 4] = 5.0
    logits[:, 6] = 4.0
    words = [[4], [8, 6]]
    params = [SamplingParams(temperature=0.0, bad_words_token_ids=words)] * 3
    p = _probs(params, [[], [8], [6]], logits)
    assert p[0].argmax() == 6  # 4 banned; 6 allowed (the output does not end with 8)
    assert p[1, 4] == 0 and p[1, 6] == 0  # after 8, the word 8 6 cannot complete
    assert p[2].argmax() == 6


def _texts(engine, requests) -> dict[str, list[int]]:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    out = run_engine(engine)
    assert_no_leaks(engine)
    return {rid: out[rid][0].token_ids for rid, _, _ in requests}


def test_edits_through_the_engine_with_and_without_speculation(engine_ckpt) -> None:
    ps = prompts(4, [5, 9, 3, 12])
    requests = [
        ("bias", ps[0], SamplingParams(max_tokens=12, temperature=0.0, logit_bias={17: 8.0, 18: 8.0})),
        ("allowed", ps[1], SamplingParams(max_tokens=12, temperature=0.0, allowed_token_ids=[30, 31, 32])),
        ("bad", ps[2], SamplingParams(max_tokens=12, temperature=0.0, bad_words_token_ids=[[40], [41]])),
        ("plain", ps[3], SamplingParams(max_tokens=12, temperature=0.0)),
    ]
    plain = _texts(make_engine(engine_ckpt), requests)
    spec = _texts(make_engine(engine_ckpt, num_speculative_tokens=2), requests)
    assert plain == spec
    assert set(plain["allowed"]) <= {30, 31, 32}
    assert not {40, 41} & set(plain["bad"])
    assert set(plain["bias"]) & {17, 18}


def test_grammar_rows_batched_beside_free_rows_with_speculation(engine_ckpt) -> None:
    import json

    from service.api import structured

    spec = structured.build_spec({"type": "or", "elements": [{"type": "const_string", "value": v}
                                                             for v in ("hello world", "hello engine")]}, False)
    ps = prompts(3, [6, 4, 8])
    requests = [("free", ps[0], SamplingParams(max_tokens=10, temperature=0.0)),
                ("choice", ps[1], SamplingParams(max_tokens=30, temperature=0.0, structured=spec)),
                ("choice-n", ps[2], SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=2, structured=spec))]
    engine = make_engine(engine_ckpt, num_speculative_tokens=2)
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    out = run_engine(engine)
    assert_no_leaks(engine)
    for rid in ("choice", "choice-n"):
        for choice in out[rid].values():
            assert choice.text in ("hello world", "hello engine"), json.dumps(choice.text)
            assert choice.finish_reason == "stop"
    alone = make_engine(engine_ckpt)
    alone.add_request("free", ps[0], SamplingParams(max_tokens=10, temperature=0.0))
    assert run_engine(alone)["free"][0].token_ids == out["free"][0].token_ids


def test_torch_bitmask_path_equals_xgrammars() -> None:
    """The accelerator path (plain torch) masks exactly what xgrammar's CPU kernel masks."""
    from service.engine.structured import apply_bitmask, unpack_and_mask

    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, 10), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, 300, generator=gen)
    rows = [0, 2, 3]
    a = apply_bitmask(logits.clone(), bitmask, rows)
    b = unpack_and_mask(logits.clone(), bitmask, rows)
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[1], logits[1])


def test_thinking_budget_forces_the_reasoning_end() -> None:
    """Once `reasoning_budget` tokens were generated without the end sequence, its next token is forced (over every
    other edit); an end the model wrote itself, or that was forced, turns the budget off."""
    from service.engine.logits_processors import forced_reasoning_end

    one = SamplingParams(temperature=1.0, reasoning_budget=2, reasoning_end_token_ids=[9])
    two = SamplingParams(temperature=0.0, reasoning_budget=1, reasoning_end_token_ids=[7, 8], allowed_token_ids=[3])
    assert [forced_reasoning_end(one, out) for out in ([1], [1, 2], [1, 9, 2], [1, 2, 9, 4])] == [None, 9, None, None]
    assert [forced_reasoning_end(two, out) for out in ([1], [1, 7], [1, 7, 8, 7], [7, 8])] == [7, 8, None, None]
    p = _probs([one, one, two], [[1], [1, 2], [1, 7]], torch.randn(3, V))
    assert p[0, 9] < 1 and p[1, 9] == 1.0 and p[2, 8] == 1.0  # forced past allowed_token_ids too


def test_thinking_budget_through_the_engine_with_and_without_speculation(engine_ckpt) -> None:
    ps = prompts(2, [6, 9])
    end = [5, 6]
    requests = [(f"budget-{b}", ps[i], SamplingParams(max_tokens=10, temperature=0.0, reasoning_budget=b,
                                                      reasoning_end_token_ids=end, bad_words_token_ids=[[5]]))
                for i, b in enumerate((0, 4))]  # the model may not write the end itself: only the budget does
    plain = _texts(make_engine(engine_ckpt), requests)
    assert plain == _texts(make_engine(engine_ckpt, num_speculative_tokens=2), requests)
    assert plain["budget-0"][:2] == end and plain["budget-4"][4:6] == end
    assert 5 not in plain["budget-4"][:4] + plain["budget-4"][6:]
