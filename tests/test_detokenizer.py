"""Incremental detokenizer on a tiny byte-level BPE: split UTF-8 characters, stop strings, multi-token pushes."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|user|>"]
CORPUS = ["Hello world, stop here please.", "The quick brown fox jumps over the lazy dog.",
          "Streaming text one token at a time.", "你好世界，今天天气很好。", "日本語のテキスト"] * 20


class Tok:
    """The minimal interface the detokenizer needs, counting how many ids it is asked to decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.special_token_ids = {tok.token_to_id(s) for s in SPECIALS}
        self.ids_decoded = 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.ids_decoded += len(ids)
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tok:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t.save(str(path))
    return Tok(Tokenizer.from_file(str(path)))


def stream(tok: Tok, ids: list[int], chunks: Sequence[int] | None = None, prompt: Sequence[int] = (),
           **kw: object) -> tuple[IncrementalDetokenizer, list[str], list]:
    d = IncrementalDetokenizer(tok, list(prompt), SamplingParams(**kw))
    deltas, outs, i = [], [], 0
    for n in chunks or [1] * len(ids):
        out = d.push(ids[i:i + n])
        i += n
        outs.append(out)
        deltas.append(out.text_delta)
        if out.stop_string is not None:
            return d, deltas, outs
    deltas.append(d.flush())
    return d, deltas, outs


MULTIBYTE = ["Hi 👋🏽 there! 😀😃", "中文测试：你好世界，很好", "mixed 日本語 and émojis 🎉 ok", "🦀" * 5 + "x"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_split_characters_never_leak_replacement(tok: Tok, text: str) -> None:
    ids = tok.encode(text)
    # precondition: some single token really is a fragment of a character, or the test proves nothing
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d, deltas, _ = stream(tok, ids, prompt=tok.encode("prompt: 你"))
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids) == text == d.text


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_concatenate_to_full_decode(tok: Tok, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", "é", "中", "😀", " ", "the ", "ok, ", "\n", "ß"]) for _ in range(80))
    ids = tok.encode(text)
    chunks, left = [], len(ids)
    while left:
        chunks.append(min(left, rng.randint(1, 4)))
        left -= chunks[-1]
    _, deltas, _ = stream(tok, ids, chunks)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text


def test_unfinished_character_is_held_then_released_by_flush(tok: Tok) -> None:
    ids = tok.encode("ab😀")
    head = ids[:-1]  # the emoji without its last byte(s)
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    assert d.push(head).text_delta == "ab"
    assert d.text == "ab"
    tail = d.flush()  # the sequence ended mid-character: the bytes come out as decoded
    assert "ab" + tail == tok.decode(head) and tail.endswith("\ufffd")


def boundaries(tok: Tok, ids: list[int]) -> list[int]:
    """Character offset at which each token's text ends."""
    return [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]


def test_stop_string_across_tokens_cut_exactly(tok: Tok) -> None:
    text = "Hello world, stop here please."
    ids = tok.encode(text)
    stop = "op he"
    begin = text.index(stop)
    ends = boundaries(tok, ids)
    assert any(begin < e < begin + len(stop) for e in ends), "stop string must span a token boundary"
    for include in (False, True):
        d, deltas, outs = stream(tok, ids, stop=["zzz", stop], include_stop_str_in_output=include)
        expected = text[:begin + len(stop)] if include else text[:begin]
        assert "".join(deltas) == expected == d.text
        assert outs[-1].stop_string == stop
        # the token that completed the stop is the last one consumed
        assert len(outs) == next(i for i, e in enumerate(ends) if e >= begin + len(stop)) + 1
        # nothing emitted is later removed: every running concatenation is a prefix of the final text
        acc = ""
        for x in deltas:
            acc += x
            assert expected.startswith(acc)


def test_possible_stop_prefix_is_held_back(tok: Tok) -> None:
    ids = tok.encode("Hello world, stop")
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["stop here!", "world."]))
    shown = ""
    for i in ids:
        shown += d.push([i]).text_delta
        assert not shown.endswith(("w", "wo", "st", "sto", "stop", "stop "))  # partial stop strings held back
    assert shown == "Hello world, "  # "world," ruled out "world.", so it went out; "stop" may still grow
    assert d.flush() == "stop" and d.text == "Hello world, stop"


def test_several_tokens_per_push_report_earliest_stop(tok: Tok) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    ends = boundaries(tok, ids)
    end_fox = text.index("fox") + 3
    k = next(i for i, e in enumerate(ends) if e >= end_fox) + 1  # tokens needed to complete "fox"
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["lazy", "fox"]))
    first = d.push(ids[:k - 2])
    out = d.push(ids[k - 2:])  # the rest in one go, like a speculative step; "fox" is inside, "lazy" later
    assert out.stop_string == "fox"
    assert first.text_delta + out.text_delta == "The quick brown " == d.text
    assert d.push(ids[:1]).text_delta == "" and d.flush() == ""  # finished: no more text


def test_longest_match_at_same_end_and_prompt_not_searched(tok: Tok) -> None:
    ids = tok.encode("Hello world, stop here please.")
    _, deltas, outs = stream(tok, ids, prompt=tok.encode("stop here"), stop=["here", "stop here"])
    assert "".join(deltas) == "Hello world, " and outs[-1].stop_string == "stop here"


def test_skip_special_tokens(tok: Tok) -> None:
    user, eot = (tok.tok.token_to_id(s) for s in SPECIALS[::-1])
    ids = tok.encode("Hello ") + [user] + tok.encode("你好") + [eot]
    _, skipped, _ = stream(tok, ids)
    assert "".join(skipped) == "Hello 你好"
    _, kept, _ = stream(tok, ids, skip_special_tokens=False)
    assert "".join(kept) == "Hello <|user|>你好<|endoftext|>"
    _, stopped, outs = stream(tok, ids, skip_special_tokens=False, stop=["<|user|>"])
    assert "".join(stopped) == "Hello " and outs[-1].stop_string == "<|user|>"


def test_many_special_tokens_in_a_row(tok: Tok) -> None:
    eot = tok.tok.token_to_id(SPECIALS[0])
    ids = tok.encode("a") + [eot] * 100 + tok.encode("b")
    _, deltas, _ = stream(tok, ids)
    assert "".join(deltas) == "ab"


def test_decoding_cost_is_linear(tok: Tok) -> None:
    ids = tok.encode("The quick brown fox 😀 jumps over 中文. " * 60)
    for n in (len(ids) // 4, len(ids)):
        tok.ids_decoded = 0
        _, deltas, _ = stream(tok, ids[:n])
        per_token = tok.ids_decoded / n
        assert per_token < 20, per_token  # a window of a few tokens, twice per token: not O(length)
    assert "".join(deltas) == tok.decode(ids)


def test_ten_thousand_stop_strings(tok: Tok) -> None:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(8, 24))) for _ in range(10_000)]
    stops = [s for s in stops if s not in "The quick brown fox jumps over the lazy dog. " * 8]
    stops.append("lazy dog. The quick")
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tok.encode(text)
    d, deltas, outs = stream(tok, ids, stop=stops)
    assert outs[-1].stop_string == "lazy dog. The quick"
    assert "".join(deltas) == text[:text.index("lazy dog. The quick")]
    # Each push tests only its new tail against a set (no timing here: speed is measured in bench/, not tests).
    assert len(d.stops.strings) == len(set(stops))
