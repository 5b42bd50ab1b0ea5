"""Incremental detokenization with stop strings, one instance per output sequence.

Decoding: like vLLM/TGI, each new token decodes a short window `ids[prefix_offset:]` and the delta is what it
adds to `ids[prefix_offset:read_offset]`; the window starts a few tokens back so tokenizers whose pieces depend
on their left neighbour (leading spaces) decode correctly, and slides forward after every emission, so the cost
per token stays constant. A decode ending in U+FFFD is an unfinished UTF-8 character and is held back until a
later token completes it (or, past `MAX_HELD_TOKENS`, accepted as genuinely invalid bytes).

Stop strings: only the characters each token adds are tested, as the end of a match, against a set of stop
strings by the few distinct stop lengths, so thousands of stop strings cost nothing per token. Text that could
still become a stop string (the longest tail that is a proper prefix of one) is held back, so nothing emitted is
ever retracted. When several tokens arrive at once, the earliest match wins and the tokens after it are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from service.engine.sampling_params import SamplingParams

__all__ = ["DetokenizerOutput", "IncrementalDetokenizer"]

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context of the first window (vLLM uses 5)
MAX_HELD_TOKENS = 16  # a UTF-8 character spans <= 4 bytes; this many undecodable tokens are real garbage
REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class DetokenizerOutput:
    text_delta: str
    stop_string: str | None = None  # the stop string that ended the sequence in this push


@dataclass(frozen=True)
class _StopSet:
    strings: frozenset[str]
    lengths: tuple[int, ...]  # distinct lengths, longest first: at one end position the longest match starts first
    prefixes: frozenset[str]  # every proper prefix of every stop string
    max_len: int


@lru_cache(maxsize=256)
def _stop_set(stops: tuple[str, ...]) -> _StopSet:
    # cached: the n choices of one request (and repeated requests) share the same stop list
    strings = frozenset(s for s in stops if s)
    prefixes = frozenset(s[:i] for s in strings for i in range(1, len(s)))
    lengths = tuple(sorted({len(s) for s in strings}, reverse=True))
    return _StopSet(strings, lengths, prefixes, max(lengths, default=0))


class IncrementalDetokenizer:
    """Streams the text of one sequence. `text` is everything emitted so far (deltas plus flush)."""

    def __init__(self, tokenizer: _Decoder, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop = params.include_stop_str_in_output
        self.stops = _stop_set(tuple(params.stop))
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if len(prompt_ids) else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._decoded = ""  # all text decoded from output tokens (may run past what is emitted)
        self._emitted = 0  # characters of `_decoded` handed out
        self.stop_string: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        return self._decoded[: self._emitted]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _step(self, force: bool = False) -> str:
        """Text the tokens since `read_offset` add, or "" while they end in an unfinished character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        held = len(self._ids) - self._read_offset
        if not force and held < MAX_HELD_TOKENS and (len(new_text) <= len(prefix_text)
                                                      or new_text.endswith(REPLACEMENT)):
            return ""  # unfinished character, or tokens that decode to nothing (skipped specials)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _find_stop(self, start: int) -> tuple[int, int, str] | None:
        """Earliest stop match ending at or after `start` in `_decoded`: (begin, end, stop)."""
        text = self._decoded
        for end in range(max(start, 0) + 1, len(text) + 1):
            for n in self.stops.lengths:
                if n <= end and (s := text[end - n:end]) in self.stops.strings:
                    return end - n, end, s
        return None

    def _add(self, delta: str) -> bool:
        """Append decoded text; on a stop match cut `_decoded` there, mark finished and return True."""
        if not delta:
            return False
        start = len(self._decoded)
        self._decoded += delta
        if not self.stops.strings or (match := self._find_stop(start)) is None:
            return False
        begin, end, stop = match
        self._decoded = self._decoded[: end if self.include_stop else begin]
        self.stop_string, self.finished = stop, True
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of `_decoded` that may still grow into a stop string."""
        text = self._decoded
        for n in range(min(self.stops.max_len - 1, len(text) - self._emitted), 0, -1):
            if text[-n:] in self.stops.prefixes:
                return n
        return 0

    def _release(self, upto: int) -> str:
        delta = self._decoded[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return delta

    def push(self, new_token_ids: Sequence[int]) -> DetokenizerOutput:
        """Feed the next output tokens; returns the text safe to show and whether (and where) a stop string hit."""
        if self.finished:
            return DetokenizerOutput("", None)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            if self._add(self._step()):
                return DetokenizerOutput(self._release(len(self._decoded)), self.stop_string)
        return DetokenizerOutput(self._release(len(self._decoded) - self._held_back()), None)

    def flush(self) -> str:
        """The sequence ended without a stop string: release held text, unfinished characters included."""
        if not self.finished:
            self._add(self._step(force=True))
            self.finished = True
        return self._release(len(self._decoded))
