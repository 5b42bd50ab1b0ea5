"""Grammar-constrained decoding with xgrammar: compile (off the engine loop, cached by spec), match, mask.

A request's grammar is an xgrammar structural tag (JSON text, built by service/api/structured.py): JSON
schemas, regexes, choices, EBNF grammars and GLM tool calls all take that one form, so one cache key covers
them. Compiling needs the tokenizer's vocabulary and can take a while for a large schema, so it runs on a
worker thread; the engine holds the request back until its grammar is ready. Each sequence gets its own
matcher: every step fills that row's bitmask before sampling and accepts the sampled token after it.

xgrammar is imported on first use: it imports transformers (several seconds), which servers that never see a
structured request should not pay for. `warm_up()` starts that import in the background.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["GrammarCompilerPool", "SequenceGrammar", "apply_bitmask", "check_spec", "compiler_message", "warm_up"]

_LOG_PREFIX = re.compile(r"^\[[0-9:. ]+\]\s*\S+?:\d+:\s*")
_TAG_TOKENS = frozenset(["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                         "<arg_value>", "</arg_value>"])
_import_lock = threading.Lock()


def _xgr() -> Any:
    with _import_lock:
        import xgrammar

        return xgrammar


def warm_up() -> None:
    """Import xgrammar on a daemon thread, so the first structured request does not wait for it."""
    threading.Thread(target=_xgr, name="xgrammar-import", daemon=True).start()


def compiler_message(error: BaseException) -> str:
    """The compiler's own words, without its log prefix (timestamp, C++ source file and line)."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return _LOG_PREFIX.sub("", lines[0]).strip() if lines else type(error).__name__


def check_spec(spec: str) -> None:
    """Raise ValueError quoting the compiler when `spec` (a structural tag) is not a valid grammar. Builds the
    grammar without a tokenizer: the parts of compiling that can fail on the client's input."""
    xgr = _xgr()
    try:
        xgr.Grammar.from_structural_tag(spec)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError, ValueError or its own types
        raise ValueError(compiler_message(e)) from None


def _tokenizer_info(tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> Any:
    """xgrammar's view of our tokenizer, built from its vocabulary (no transformers tokenizer object).

    Special tokens other than GLM's markup tags get an empty string, which xgrammar treats as never allowed
    (stop tokens excepted): their text is dropped when output is decoded, so a grammar must not count on it."""
    xgr = _xgr()
    vocab = tokenizer.encoded_vocab()
    encoded = [""] * vocab_size
    for i, piece in enumerate(vocab[:vocab_size]):
        if i not in tokenizer.special_token_ids or piece in _TAG_TOKENS:
            encoded[i] = piece
    kind = {"byte_level": xgr.VocabType.BYTE_LEVEL, "byte_fallback": xgr.VocabType.BYTE_FALLBACK}.get(
        tokenizer.vocab_kind, xgr.VocabType.RAW)
    return xgr.TokenizerInfo(encoded, vocab_type=kind, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids),
                             add_prefix_space=False)


class GrammarCompilerPool:
    """Compiles specs on one worker thread; the futures stay cached (LRU) so repeated schemas compile once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int], max_cached: int = 256) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = set(stop_ids)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._compiler: Any = None
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._max_cached = max_cached
        self.vocab_size = vocab_size

    def submit(self, spec: str) -> Future:
        future = self._cache.get(spec)
        if future is not None:
            self._cache.move_to_end(spec)
            return future
        future = self._executor.submit(self._compile, spec)
        self._cache[spec] = future
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return future

    def _compile(self, spec: str) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = _tokenizer_info(self._tokenizer, self._vocab_size, self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        try:
            return self._compiler.compile_structural_tag(spec)
        except Exception as e:  # noqa: BLE001
            raise ValueError(compiler_message(e)) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher over a compiled grammar."""

    __slots__ = ("matcher",)

    def __init__(self, compiled: Any) -> None:
        self.matcher = _xgr().GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return _xgr().allocate_token_bitmask(rows, vocab_size)


_BITS: dict[torch.device, torch.Tensor] = {}  # device -> arange(32) as int32, the bit positions of a mask word


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """-inf on the tokens the grammar forbids, in the constrained rows of `logits` [B, V] (in place)."""
    if logits.device.type == "cpu":
        _xgr().apply_token_bitmask_inplace(logits, bitmask, indices=rows)  # ~0.7 ms for 8 rows of 8K, one thread
        return logits
    return unpack_and_mask(logits, bitmask, rows)


def unpack_and_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The same in plain torch, for accelerators: xgrammar's CUDA path needs triton and a mask on the device."""
    device = logits.device
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, device=device, dtype=torch.int32)
    idx = torch.tensor(rows, device=device)
    mask = bitmask[rows].to(device, non_blocking=True)
    allowed = ((mask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return logits
