"""Per-request logits edits: OpenAI's `logit_bias`, vLLM's `allowed_token_ids` and `bad_words`, and a thinking
budget that forces the end of a reasoning block.

Built once per sampler call for the rows that ask for them, applied to the penalised logits before temperature
and truncation, so greedy rows, sampled rows, MTP drafts and their verification all see the same edited
distribution. Bad words are token sequences: a one-token word is always banned; a longer word bans its last
token wherever the output so far ends with the rest of it (vLLM's rule). A spent thinking budget forces the next
token of the reasoning's end (`</think>`, one or more tokens) over every other edit; a grammar, applied after
these edits, must allow it (its reasoning part ends with that same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

__all__ = ["LogitsEdits", "forced_reasoning_end"]


def forced_reasoning_end(params: SamplingParams, out: Sequence[int]) -> int | None:
    """The token a spent thinking budget forces next, or None. The reasoning has ended once its end sequence
    appears; it can only appear within the budget plus its own length (later, it was forced there)."""
    budget, end = params.reasoning_budget, params.reasoning_end_token_ids
    if budget is None or len(out) < budget:
        return None
    window = list(out[: budget + len(end)])
    if end[0] in window and (len(end) == 1 or any(window[i:i + len(end)] == end
                                                  for i in range(len(window) - len(end) + 1))):
        return None
    tail = list(out[len(out) - len(end) + 1:])  # the end may be under way (forced, or begun by the model)
    done = max((k for k in range(1, len(end)) if tail[len(tail) - k:] == end[:k]), default=0)
    return end[done]


@dataclass
class LogitsEdits:
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # rows [R], mask [R, V] (True = allowed)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids
    forced: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, the one token each must take

    @classmethod
    def build(cls, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]], vocab_size: int,
              device: torch.device | str) -> LogitsEdits | None:
        """None when no row edits its logits (the common case costs one pass over the params)."""
        if not any(p.has_logits_edits for p in params):
            return None
        b_rows: list[int] = []
        b_toks: list[int] = []
        b_vals: list[float] = []
        a_rows: list[int] = []
        a_lists: list[list[int]] = []
        x_rows: list[int] = []
        x_toks: list[int] = []
        f_rows: list[int] = []
        f_toks: list[int] = []
        for i, (p, out) in enumerate(zip(params, output_ids, strict=True)):
            for tok, val in (p.logit_bias or {}).items():
                b_rows.append(i)
                b_toks.append(tok)
                b_vals.append(val)
            if p.allowed_token_ids:
                a_rows.append(i)
                a_lists.append(p.allowed_token_ids)
            for word in p.bad_words_token_ids or []:
                n = len(word) - 1
                if n == 0 or (len(out) >= n and list(out[len(out) - n:]) == list(word[:n])):
                    x_rows.append(i)
                    x_toks.append(word[-1])
            if (tok := forced_reasoning_end(p, out)) is not None:
                f_rows.append(i)
                f_toks.append(tok)

        def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, device=device)

        allowed = None
        if a_rows:
            mask = torch.zeros((len(a_rows), vocab_size), dtype=torch.bool, device=device)
            for r, ids in enumerate(a_lists):
                mask[r, t(ids)] = True
            allowed = (t(a_rows), mask)
        return cls(bias=(t(b_rows), t(b_toks), t(b_vals, torch.float32)) if b_rows else None, allowed=allowed,
                   banned=(t(x_rows), t(x_toks)) if x_rows else None,
                   forced=(t(f_rows), t(f_toks)) if f_rows else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Edited copy of `logits` [B, V]."""
        logits = logits.clone()
        if self.bias is not None:
            rows, toks, vals = self.bias
            logits.index_put_((rows, toks), vals.to(logits.dtype), accumulate=True)
        if self.allowed is not None:
            rows, mask = self.allowed
            logits[rows] = logits[rows].masked_fill(~mask, float("-inf"))
        if self.banned is not None:
            rows, toks = self.banned
            logits[rows, toks] = float("-inf")
        if self.forced is not None:
            rows, toks = self.forced
            logits[rows] = float("-inf")
            logits[rows, toks] = 0.0
        return logits
