"""What the engine hands back: streamed text, stop strings / stop tokens / eos, logprobs, prompt logprobs, request
validation, a tokenizer-less checkpoint, and a failing step that fails only its own requests."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import accumulate, assert_no_leaks, greedy, make_checkpoint, make_engine, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 20
# Prompts of whole characters: text at the prompt/output seam then belongs to the output alone.
TEXTS = ["hello world", "The quick brown fox jumps", "def forward(self, x):", "Grüße aus Köln, naïve café",
         "日本語のテキスト and more", "hello engine, hello cache", "over the lazy dog.", "émoji 🙂 hello"]


@pytest.fixture(scope="module")
def engine(engine_ckpt):
    return make_engine(engine_ckpt)


@pytest.fixture(scope="module", name="text_prompts")
def prompts_fixture(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def free_run(text_prompts, engine) -> list:
    """Greedy outputs with no stop conditions, streamed, plus each request's accumulated text after every step."""
    for i, p in enumerate(text_prompts):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    results: dict = {}
    partial: dict[str, list[str]] = {str(i): [] for i in range(len(text_prompts))}
    while engine.has_unfinished():
        accumulate(results, engine.step())
        for rid, choices in results.items():
            partial[rid].append(choices[0].text)
    return [(results[str(i)][0], partial[str(i)]) for i in range(len(text_prompts))]


def test_streamed_text_is_the_decoded_tokens_and_never_retracted(engine, free_run) -> None:
    tok = engine.tokenizer
    splits = 0
    for choice, partial in free_run:
        final = tok.decode(choice.token_ids)
        assert choice.text == final
        assert all(final.startswith(text) for text in partial)  # a streamed character is never taken back
        # A character whose bytes span tokens: decoding the shorter prefix shows a replacement character.
        for k in range(1, len(choice.token_ids)):
            head = tok.decode(choice.token_ids[:k])
            splits += head.endswith("\ufffd") and not final[: len(head)].endswith("\ufffd")
    assert splits > 0, "no multi-byte character was split across tokens: the test proved nothing"


def boundary_stop(tok, token_ids: list[int], text: str) -> tuple[str, int, int]:
    """A 4-character stop string straddling a token boundary, found first there: (stop, its start, tokens before)."""
    for k in range(2, len(token_ids) - 1):
        b = len(tok.decode(token_ids[:k]))
        stop = text[b - 2 : b + 2]
        if tok.decode(token_ids[:k]) == text[:b] and len(stop) == 4 and "\ufffd" not in stop \
                and text.find(stop) == b - 2:
            return stop, b - 2, k
    raise AssertionError("no clean token boundary")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundary(text_prompts, engine, free_run, include: bool) -> None:
    tok = engine.tokenizer
    for i in (0, 1, 2):
        choice = free_run[i][0]
        stop, start, k = boundary_stop(tok, choice.token_ids, choice.text)
        engine.add_request("s", text_prompts[i], greedy(MAX_TOKENS, stop=["@@never", stop],
                                                   include_stop_str_in_output=include))
        got = run_engine(engine)["s"][0]
        assert (got.finish_reason, got.stop_reason) == ("stop", stop)
        assert got.text == choice.text[: start + len(stop) if include else start]
        assert k < len(got.token_ids) and got.token_ids == choice.token_ids[: len(got.token_ids)]
    assert_no_leaks(engine)


def test_stop_token_ids_and_eos(text_prompts, engine, free_run) -> None:
    tok = engine.tokenizer
    choice = free_run[3][0]
    j = 5
    stop_id = choice.token_ids[j]
    first = choice.token_ids.index(stop_id)
    engine.add_request("t", text_prompts[3], greedy(MAX_TOKENS, stop_token_ids=[stop_id]))
    got = run_engine(engine)["t"][0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_id)
    assert got.token_ids == choice.token_ids[: first + 1]  # the stop token is returned, its text is not
    assert got.text == tok.decode(choice.token_ids[:first])

    saved = set(engine.eos_token_ids)
    engine.eos_token_ids = {stop_id}
    try:
        engine.add_request("eos", text_prompts[3], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        engine.add_request("ignore", text_prompts[3], greedy(MAX_TOKENS))
        results = run_engine(engine)
    finally:
        engine.eos_token_ids = saved
    eos = results["eos"][0]
    assert (eos.finish_reason, eos.stop_reason, eos.token_ids) == ("stop", None, choice.token_ids[: first + 1])
    assert results["ignore"][0].token_ids == choice.token_ids and results["ignore"][0].finish_reason == "length"


def test_logprobs_of_greedy_tokens(text_prompts, engine, free_run) -> None:
    engine.add_request("lp", text_prompts[1], greedy(MAX_TOKENS, logprobs=4))
    got = run_engine(engine)["lp"][0]
    assert got.token_ids == free_run[1][0].token_ids and len(got.logprobs) == MAX_TOKENS
    for token, lp in zip(got.token_ids, got.logprobs, strict=True):
        assert lp.token_id == token and len(lp.top) == 4 and lp.top[0][0] == token
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0
    assert free_run[1][0].logprobs == []  # not asked for, not sent


@pytest.mark.parametrize("budget", [2048, 5])
def test_prompt_logprobs_match_transformers(text_prompts, engine_ckpt, hf_oracle, budget: int) -> None:
    prompt = text_prompts[2]
    engine = make_engine(engine_ckpt, max_num_batched_tokens=budget)
    engine.add_request("p", prompt, greedy(3, prompt_logprobs=2))
    engine.add_request("other", text_prompts[1], greedy(3))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == "p"]
    sent = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(sent) == 1 and outs[0].prompt_logprobs is not None  # once, with the first output
    plp = sent[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_oracle(torch.tensor([prompt])).logits[0].double(), dim=-1)
    assert len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        assert plp[i].token_id == prompt[i]
        assert plp[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in plp[i].top] == ref[i - 1].topk(2).indices.tolist()


def test_invalid_requests_are_refused(engine) -> None:
    V = engine.model_config.vocab_size
    cases = [
        ([], greedy(4), "empty"),
        ([1, V], greedy(4), "token ids"),
        ([1, -1], greedy(4), "token ids"),
        ([1] * (engine.max_model_len - 3), greedy(4), "maximum model length"),
        ([1, 2], greedy(4, n=engine.config.max_num_seqs + 1), "max_num_seqs"),
    ]
    for prompt, params, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, params)
    engine.add_request("dup", [1, 2], greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], greedy(2))
    run_engine(engine)
    assert_no_leaks(engine)


def test_tokenizer_less_checkpoint_serves_token_ids(text_prompts, tmp_path, engine, free_run) -> None:
    # Same weights (same seed) without tokenizer files: same tokens, empty text, no stop strings.
    bare = make_engine(make_checkpoint(tmp_path / "bare", tokenizer=False))
    assert bare.tokenizer is None
    bare.add_request("x", text_prompts[0], greedy(MAX_TOKENS))
    got = run_engine(bare)["x"][0]
    assert got.token_ids == free_run[0][0].token_ids and got.text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        bare.add_request("y", text_prompts[0], greedy(4, stop=["a"]))


def test_a_failing_step_fails_only_its_requests(text_prompts, engine, free_run) -> None:
    engine.add_request("ok", text_prompts[0], greedy(MAX_TOKENS))
    results: dict = {}
    accumulate(results, engine.step())
    engine.add_request("doomed", text_prompts[1], greedy(MAX_TOKENS, n=2))

    def fault(sched) -> None:
        if any(s.request_id == "doomed" for s, _ in sched.scheduled):
            raise RuntimeError("injected")

    engine.fault_injector = fault
    outs = engine.step()  # "ok" shares this step with "doomed": both fail
    engine.fault_injector = None
    assert {o.request_id for o in outs} == {"ok", "doomed"}
    for o in outs:
        assert o.finished and o.error == "RuntimeError: injected"
        assert all(c.finish_reason == "error" for c in o.outputs)
    assert sorted(c.index for o in outs if o.request_id == "doomed" for c in o.outputs) == [0, 1]
    assert_no_leaks(engine)
    engine.add_request("after", text_prompts[0], greedy(MAX_TOKENS))  # the engine still serves, correctly
    assert run_engine(engine)["after"][0].token_ids == free_run[0][0].token_ids


def test_cache_sizing_and_device_settings(engine_ckpt) -> None:
    from service.engine.config import EngineConfig
    from service.engine.model_runner import resolve_device_dtype

    # By memory fraction: never more than max_num_seqs full-length sequences can use.
    roomy = make_engine(engine_ckpt, kv_cache_tokens=None, max_num_seqs=3)
    assert roomy.block_manager.num_blocks == 3 * 256 // 4 and roomy.max_model_len == 256
    # A cache smaller than max_model_len lowers it: one sequence must always fit.
    tiny = make_engine(engine_ckpt, kv_cache_tokens=None, kv_cache_memory_fraction=1e-12)
    assert tiny.block_manager.num_blocks == 1 and tiny.max_model_len == 4
    with pytest.raises(ValueError, match="maximum model length"):
        tiny.add_request("long", [1, 2, 3], greedy(2))
    auto = (torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(EngineConfig(model=engine_ckpt)) == auto
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype(EngineConfig(model=engine_ckpt, dtype="int8"))
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(engine_ckpt, max_model_len=10_000)
