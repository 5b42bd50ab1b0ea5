"""A request's state inside the engine: one `Sequence` per choice, grouped by `SequenceGroup`.

vLLM v1's accounting: a sequence has `num_tokens` (prompt + generated) and `num_computed_tokens` (those whose
cache entries are written). Every step the scheduler lets the latter catch up with the former; the same rule
covers whole prefill, chunked prefill, decode and recompute after preemption. A step that computes a
sequence's last token samples the next one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .outputs import TokenLogprob
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation
    RUNNING = "running"  # holds cache blocks
    FORKING = "forking"  # choice > 0 of an n>1 request, waiting for choice 0's prefill to share its prompt
    FINISHED = "finished"


class Sequence:
    """One choice of a request: its tokens, cache blocks and per-choice sampling state."""

    def __init__(self, group: SequenceGroup, index: int, generator: torch.Generator | None,
                 detokenizer: Any | None) -> None:
        self.group = group
        self.index = index
        self.prompt_token_ids = group.prompt_token_ids
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.generator = generator
        self.detokenizer = detokenizer
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Not yet reported to the caller (flushed into a CompletionOutput by the engine).
        self.new_token_ids: list[int] = []
        self.new_text = ""
        self.new_logprobs: list[TokenLogprob] = []
        self.finish_reported = False
        # Speculative decoding: tokens the MTP layer drafted for the next step to verify, and their draft
        # distributions q ([V] each) for the rejection test.
        self.draft_token_ids: list[int] = []
        self.draft_probs: list[torch.Tensor | None] = []  # None: a greedy draft
        # Prefix caching: hashes of the full blocks of known tokens (BlockManager.block_hashes), how many leading
        # blocks of the table were offered to the cache, and positions whose MTP entries are valid (written by
        # the MTP layer with the true next token).
        self.block_hashes: list = []
        self.num_cached_blocks = 0
        self.num_mtp_tokens = 0
        # Main-model hidden rows of the positions after num_mtp_tokens whose MTP entries are deferred while the
        # engine drafts nothing (MTPProposer writes them in one batch later).
        self.mtp_hidden: list[torch.Tensor] = []
        # Structured output: this choice's grammar matcher (service.engine.structured.SequenceGrammar), set once
        # the request's grammar has compiled; None for unconstrained requests.
        self.grammar: Any = None

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def slots(self, positions: Iterable[int], block_size: int) -> list[int]:
        """Cache slots of these positions: their block's id times the block size, plus the offset in it."""
        table = self.block_table
        return [table[p // block_size] * block_size + p % block_size for p in positions]

    def token_at(self, position: int) -> int:
        """The known token at `position` of prompt + output."""
        P = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < P else self.output_token_ids[position - P]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output."""
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P : end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - P]

    def input_token_ids(self, start: int, end: int) -> list[int]:
        """Like token_ids, continued past the last token by the drafts (what a verify step feeds)."""
        ids = self.token_ids(start, min(end, self.num_tokens))
        if end > self.num_tokens:
            ids += self.draft_token_ids[: end - self.num_tokens]
        return ids

    def clear_drafts(self, keep: int = 0) -> None:
        del self.draft_token_ids[keep:], self.draft_probs[keep:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is gone, prompt + generated tokens are computed again later."""
        self.clear_drafts()
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_cached_blocks = 0
        self.num_mtp_tokens = 0
        self.mtp_hidden = []
        self.status = SequenceStatus.WAITING

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


@dataclass(eq=False)  # identity: groups are dict keys and set members in the engine
class SequenceGroup:
    """A request: its prompt, parameters and the `n` choices that share the prompt's prefill.

    Choice 0 prefills the prompt; the other choices wait in FORKING and, when that prefill completes, take
    their first token from the same logits (each with its own generator) and share the prompt's cache blocks.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_scheduled_time: float | None = None
    queue_time_reported: bool = False
    # Prompt logprobs (params.prompt_logprobs): filled chunk by chunk during the first prefill, sent once.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_reported: bool = False
    # Prompt tokens served from the prefix cache when the request was first scheduled (usage.cached_tokens).
    num_cached_tokens: int | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def forking(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is SequenceStatus.FORKING]

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.output_token_ids) for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt logprobs are still being collected (only the first prefill computes them)."""
        return self.params.prompt_logprobs is not None and (
            self.prompt_logprobs is None or len(self.prompt_logprobs) < len(self.prompt_token_ids))
