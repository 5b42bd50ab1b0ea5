"""Text and stop strings in the API process (service/engine/output_processor.py) against the engine doing both
in its step: the same tokens, text, finish and stop reasons and usage; the engine stops a choice a stop string
ended and frees it."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.client import EngineClient
from service.engine.config import EngineConfig
from service.engine.output_processor import RequestDetokenizer
from service.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from service.engine.sampling_params import SamplingParams
from tests.engine_fixtures import Choice, accumulate, assert_no_leaks, greedy, make_engine, prompts, run_engine, until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = prompts(6, [5, 17, 9, 30, 12, 7], seed=11)


class CharTokenizer:
    """Token t decodes to chr(t); 0 is a special token (skipped) and the EOS."""

    eos_token_ids = {0}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in ids if t or not skip_special_tokens)


def out(rid: str, *choices: CompletionOutput, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, list(choices), finished=finished)


def test_a_stop_string_cuts_the_choice_and_drops_what_follows() -> None:
    params = SamplingParams(max_tokens=50, stop=["cd"], n=2, logprobs=0)
    text = RequestDetokenizer(CharTokenizer(), [], params, {0})
    lps = [TokenLogprob(t, -1.0) for t in b"abcdef"]
    first = out("r", CompletionOutput(0, "", list(b"abcdef"), logprobs=lps), CompletionOutput(1, "", list(b"xy")))
    assert text.process(first) == [0]  # choice 0 ended here while the engine still generates it
    c0, c1 = first.outputs
    assert (c0.text, c0.token_ids, c0.finish_reason, c0.stop_reason) == ("ab", list(b"abcd"), "stop", "cd")
    assert [lp.token_id for lp in c0.logprobs] == list(b"abcd")
    assert (c1.text, c1.finish_reason) == ("xy", None) and not first.finished
    assert first.num_generated_tokens == 6  # usage counts only the tokens kept
    # The engine's next step still had choice 0: dropped; choice 1 ends by length, its held text released.
    second = out("r", CompletionOutput(0, "", list(b"gh")),
                 CompletionOutput(1, "", list(b"zc"), finish_reason="length"), finished=True)
    assert text.process(second) == []
    assert [(c.index, c.text, c.finish_reason) for c in second.outputs] == [(1, "zc", "length")]
    assert second.finished and second.num_generated_tokens == 8


def test_the_last_choice_stopped_here_ends_the_request() -> None:
    text = RequestDetokenizer(CharTokenizer(), [], SamplingParams(max_tokens=50, stop=["!"]), {0})
    o = out("r", CompletionOutput(0, "", list(b"hi!!")))
    assert text.process(o) == [0] and o.finished and o.outputs[0].text == "hi"


def test_stop_tokens_show_only_when_asked_and_ignore_eos_keeps_going() -> None:
    eos_end = out("r", CompletionOutput(0, "", [104, 0], finish_reason="stop"), finished=True)
    RequestDetokenizer(CharTokenizer(), [], SamplingParams(max_tokens=9, stop_token_ids=[33]), {0}).process(eos_end)
    assert eos_end.outputs[0].text == "h"
    shown = out("r", CompletionOutput(0, "", [104, 33], finish_reason="stop", stop_reason=33), finished=True)
    params = SamplingParams(max_tokens=9, stop_token_ids=[33], include_stop_str_in_output=True)
    RequestDetokenizer(CharTokenizer(), [], params, {0}).process(shown)
    assert shown.outputs[0].text == "h!" and shown.outputs[0].stop_reason == 33


def _stops_from(reference: dict[str, dict[int, Choice]]) -> dict[str, str]:
    """Per request, two characters from the middle of its choice 0's text: a stop string that will hit."""
    stops = {}
    for rid, choices in reference.items():
        t = choices[0].text
        stops[rid] = t[len(t) // 2: len(t) // 2 + 2] if len(t) >= 4 else "\x00"
    return stops


def _params(i: int, stop: str, max_tokens: int = 24) -> SamplingParams:
    if i % 2:  # seeded sampling, two choices: the stop string may end one and not the other
        return SamplingParams(temperature=1.0, seed=7 + i, n=2, max_tokens=max_tokens, ignore_eos=True, stop=[stop],
                              include_stop_str_in_output=i % 3 == 0, logprobs=1)
    return greedy(max_tokens, stop=[stop], include_stop_str_in_output=i % 3 == 0)


@pytest.mark.parametrize("k", [0, 2])
def test_the_api_process_text_equals_the_engine_text(engine_ckpt, k: int) -> None:
    free = make_engine(engine_ckpt, num_speculative_tokens=k)
    for i, p in enumerate(PROMPTS):
        free.add_request(str(i), p, _params(i, "\x00"))
    stops = _stops_from(run_engine(free))
    sync = make_engine(engine_ckpt, num_speculative_tokens=k)
    for i, p in enumerate(PROMPTS):
        sync.add_request(str(i), p, _params(i, stops[str(i)]))
    expected = run_engine(sync)
    assert sum(c.stop_reason == stops[rid] for rid, ch in expected.items() for c in ch.values()) >= len(PROMPTS)

    async def main() -> None:
        engine = EngineClient.in_thread(EngineConfig(model=engine_ckpt, device="cpu", dtype="float32",
                                                     kv_cache_tokens=4096, block_size=4, num_speculative_tokens=k,
                                                     speculative_policy="fixed"))
        local = engine.local_engine
        assert not local.config.detokenize  # the engine's step does no tokenizer work
        stopped = []
        finish = local.finish_choice
        local.finish_choice = lambda rid, index: stopped.append(finish(rid, index)) or stopped[-1]
        await engine.start()
        got: dict[str, dict[int, Choice]] = {}
        usage = {}

        async def one(i: int, p: list[int]) -> None:
            async for o in engine.generate(str(i), p, _params(i, stops[str(i)])):
                accumulate(got, [o])
                usage[str(i)] = o.num_generated_tokens

        await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        for rid, choices in expected.items():
            for index, want in choices.items():
                have = got[rid][index]
                assert (have.token_ids, have.text, have.finish_reason, have.stop_reason) == (
                    want.token_ids, want.text, want.finish_reason, want.stop_reason), (rid, index)
                assert [lp.token_id for lp in have.logprobs] == [lp.token_id for lp in want.logprobs]
            assert usage[rid] == sum(len(c.token_ids) for c in choices.values())
        assert sum(stopped) >= len(PROMPTS) // 2  # the engine was told, and stopped those choices early
        blocks = local.block_manager
        await until(lambda: not local.requests and blocks.num_free_blocks == blocks.num_blocks)
        await engine.shutdown()

    asyncio.run(main())


def test_finish_choice_stops_one_choice_and_frees_it(engine_ckpt) -> None:
    engine = make_engine(engine_ckpt, detokenize=False)
    engine.add_request("r", PROMPTS[1], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=12, ignore_eos=True))
    seen: dict[str, dict[int, Choice]] = {}
    for _ in range(3):
        accumulate(seen, engine.step())
    assert engine.finish_choice("r", 0) and not engine.finish_choice("r", 0)
    assert not engine.finish_choice("r", 5) and not engine.finish_choice("nope", 0)
    after: dict[str, dict[int, Choice]] = {}
    while engine.has_unfinished():
        accumulate(after, engine.step())
    assert set(after["r"]) == {1} and after["r"][1].finish_reason == "length"
    assert all(c.text == "" for c in seen["r"].values())  # token ids only
    assert_no_leaks(engine)
    # Both choices stopped from outside: the request is gone without an output.
    engine.add_request("s", PROMPTS[2], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.finish_choice("s", 1) and engine.finish_choice("s", 0)
    assert not engine.has_unfinished() and engine.step() == []
    assert_no_leaks(engine)
