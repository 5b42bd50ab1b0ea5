"""Logprobs in the two OpenAI shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and legacy
completions (`tokens`, `token_logprobs`, `top_logprobs` dicts, `text_offset`).

Token strings are the decoded single token; `return_tokens_as_token_ids` (vLLM) writes `token_id:<id>`
instead, which is unambiguous for byte-level tokens that are not valid UTF-8 on their own.
"""

from __future__ import annotations

import math
from typing import Any

from service.engine.outputs import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


def _lp(value: float) -> float:
    return _FLOOR if math.isnan(value) or value < _FLOOR else float(value)


class TokenNamer:
    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self._tok = tokenizer
        self._as_ids = as_ids or tokenizer is None
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        name = self._cache.get(token_id)
        if name is None:
            name = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return name


def chat_logprobs(entries: list[TokenLogprob], name: TokenNamer) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = name(token_id)
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


class CompletionLogprobs:
    """Accumulates the legacy shape for one choice; `text_offset` continues across streamed deltas."""

    def __init__(self, name: TokenNamer, start_offset: int = 0) -> None:
        self._name = name
        self.offset = start_offset

    def format(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for token_id, entry in zip(token_ids, entries, strict=False):
            token = self._name(token_id)
            out["tokens"].append(token)
            out["text_offset"].append(self.offset)
            self.offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(entry.logprob))
            top = {self._name(t): _lp(lp) for t, lp in entry.top}
            top.setdefault(token, _lp(entry.logprob))  # OpenAI/vLLM list the sampled token too
            out["top_logprobs"].append(top)
        return out
