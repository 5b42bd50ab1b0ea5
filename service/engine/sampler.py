"""Batched token sampling: penalties -> temperature -> top_k -> top_p -> min_p, then a seeded draw.

Every step the engine builds one `SamplingState` (per-row parameter tensors) and calls `Sampler.sample`.
All arithmetic runs over the whole [B, V] batch at once; the only per-row Python work is drawing the
random numbers of seeded rows with their own generator, so a seeded request consumes exactly the same
random numbers whatever else shares the batch (its output depends on its seed alone).

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
It needs one draw per vocabulary entry, which makes each row's consumption fixed (V numbers per call).
Speculative decoding calls `probs` for the target p and the draft q and `sample_from_probs` /
`uniform` for its residual draw and acceptance test, so it shares this exact distribution and RNG use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.logits_processors import LogitsEdits
from service.engine.outputs import TokenLogprob
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence as Seq

__all__ = ["Sampler", "SamplerOutput", "SamplingState", "apply_penalties", "argmax_rows", "compute_logprobs"]

ARGMAX_BLOCK = 128  # argmax_rows' block width: 6x faster than argmax over [64, 8192] on one core


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [B, V] tensor, the same index (first of ties, NaN counting as the largest).

    CPU argmax is a scalar loop (~3 ns per entry; 1.6 ms for 64 rows of 8192), while amax is vectorised: take
    each block's max, the first block holding the row's max, then argmax only inside that block."""
    B, V = x.shape
    if x.device.type != "cpu" or B < 4 or V % ARGMAX_BLOCK or not x.is_contiguous():
        return x.argmax(dim=-1)
    blocks = x.view(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    j = blocks.amax(dim=-1).argmax(dim=-1)
    return j * ARGMAX_BLOCK + blocks[torch.arange(B, device=x.device), j].argmax(dim=-1)


def _flat_index(rows: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of ragged id lists as two flat int64 tensors, built without a loop in torch."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    tok_idx = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return row_idx.to(device), tok_idx.to(device)


@dataclass
class SamplingState:
    """Per-row sampling tensors for one step ([B] each), built once and shared by every sampler call."""

    temperature: torch.Tensor  # float; greedy rows hold 1.0 so division is harmless
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # long; 0 ("off") stored as a huge value so `rank >= k` never fires
    top_p: torch.Tensor
    min_p: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    generators: list[torch.Generator | None]
    logprobs: list[int | None]
    # Ragged token ids flattened to (row, token) pairs; scattered into [B, V] once V is known (in the sampler).
    output_index: tuple[torch.Tensor, torch.Tensor] | None
    seen_index: tuple[torch.Tensor, torch.Tensor] | None  # prompt + output, for the repetition penalty
    is_greedy: list[bool]
    needs_truncation: bool
    needs_top_p: bool
    needs_min_p: bool
    # logit_bias / allowed_token_ids / bad_words rows: (params, output ids), turned into edits once V is known
    edit_inputs: tuple[list[SamplingParams], list[list[int]]] | None = None
    # Grammar-constrained rows: an xgrammar token bitmask [B, ceil(V/32)] int32 and the rows it applies to
    bitmask: tuple[torch.Tensor, list[int]] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def all_greedy(self) -> bool:
        return all(self.is_greedy)

    @classmethod
    def of(cls, seqs: list[Seq], device: torch.device | str, num_drafts: list[int] | None = None,
           seeded: bool = True) -> SamplingState:
        """One row per sequence. Row i's penalty history is its output plus its first `num_drafts[i]` drafts;
        `seeded=False` leaves out the sequences' generators (target probabilities need no randomness)."""
        drafts = num_drafts or [0] * len(seqs)
        return cls.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                         [s.output_token_ids + s.draft_token_ids[:d] for s, d in zip(seqs, drafts, strict=True)],
                         [s.generator if seeded else None for s in seqs], device)

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              generators: list[torch.Generator | None], device: torch.device | str) -> SamplingState:
        if not (len(params) == len(prompt_ids) == len(output_ids) == len(generators)):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")

        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        any_freq_pres = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        any_rep = any(p.repetition_penalty != 1.0 for p in params)
        output_index = seen_index = None
        if any_freq_pres:
            output_index = _flat_index(output_ids, device)
        if any_rep:
            seen_index = _flat_index([list(p) + list(o) for p, o in zip(prompt_ids, output_ids, strict=True)], device)
        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=col([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]),
            greedy=col(greedy, torch.bool),
            top_k=col([p.top_k if p.top_k > 0 else 2**62 for p in params], torch.long),
            top_p=col([p.top_p for p in params]),
            min_p=col([p.min_p for p in params]),
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            repetition=col([p.repetition_penalty for p in params]),
            generators=list(generators),
            logprobs=[p.logprobs for p in params],
            output_index=output_index,
            seen_index=seen_index,
            is_greedy=greedy,
            needs_truncation=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sampled),
            needs_top_p=any(p.top_p < 1.0 for p in sampled),
            needs_min_p=any(p.min_p > 0.0 for p in sampled),
            edit_inputs=(list(params), [list(o) for o in output_ids]) if any(p.has_logits_edits for p in params)
            else None,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _bincount_2d(index: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int], device: torch.device
                 ) -> torch.Tensor:
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    rows, toks = index
    if toks.numel():
        counts.index_put_((rows, toks), torch.ones_like(toks, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """vLLM/OpenAI penalties on a copy of `logits` [B, V].

    repetition_penalty r on every token seen in prompt or output: positive logits / r, negative ones * r;
    then frequency f and presence p on output tokens only: logit -= f * count + p * (count > 0).
    """
    if state.seen_index is None and state.output_index is None:
        return logits
    logits = logits.clone()
    if state.seen_index is not None:
        seen = _bincount_2d(state.seen_index, logits.shape, logits.device) > 0
        r = state.repetition[:, None]
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if state.output_index is not None:
        counts = _bincount_2d(state.output_index, logits.shape, logits.device)
        logits -= state.frequency[:, None] * counts + state.presence[:, None] * (counts > 0).float()
    return logits


def _truncate(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Mask (to -inf) what top_k, then top_p on the top_k-renormalised probs, then min_p remove.

    Each filter keeps a prefix of the tokens sorted by probability, so one sort serves all three; min_p
    compares against the top probability, a ratio renormalisation does not change. The top token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = ranks[None, :] >= state.top_k[:, None]
    sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    if state.needs_top_p:
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # top_p == 1 rows are exempt: rounding can push the running sum to 1.0 before the tail ends
        remove |= (mass_before >= state.top_p[:, None]) & (state.top_p[:, None] < 1.0)
    if state.needs_min_p:
        remove |= sorted_probs < state.min_p[:, None] * sorted_probs[:, :1]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int], k: int) -> list[TokenLogprob]:
    """Raw log-softmax of `logits` [N, V] at `token_ids` [N], each with its top `k` alternatives, best first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).reshape(-1, 1)
    chosen = logp.gather(1, ids).squeeze(1).tolist()
    if k > 0:
        top_vals, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_vals.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(token_id=t, logprob=lp, top=top)
            for t, lp, top in zip(ids.squeeze(1).tolist(), chosen, tops, strict=True)]


class Sampler:
    """Stateless apart from an optional generator for unseeded rows (None: torch's global RNG)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def probs(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """The processed distribution [B, V]; greedy rows are one-hot at the argmax of the penalised logits."""
        logits = apply_penalties(logits.float(), state)
        if state.edit_inputs is not None:
            edits = LogitsEdits.build(*state.edit_inputs, logits.shape[-1], logits.device)
            if edits is not None:
                logits = edits.apply(logits)
        if state.bitmask is not None:
            from service.engine.structured import apply_bitmask  # xgrammar loads only once a grammar is used

            logits = apply_bitmask(logits.clone(), *state.bitmask)  # in place: spare the caller's logits
        if any(state.is_greedy):
            one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
            if state.all_greedy:
                return one_hot
        logits = logits / state.temperature[:, None]
        if state.needs_truncation:
            logits = _truncate(logits, state)
        probs = logits.softmax(dim=-1)
        return torch.where(state.greedy[:, None], one_hot, probs) if any(state.is_greedy) else probs

    def _draw(self, state: SamplingState, shape: tuple[int, ...], device: torch.device, exponential: bool
              ) -> torch.Tensor:
        """Random numbers [B, *shape]: each seeded row from its own generator (always the same count, drawn on the
        generator's device so it never depends on the batch), all unseeded rows together from `self.generator`.
        Greedy rows need no randomness and draw none (they hold 1.0)."""
        out = torch.ones((state.batch_size, *shape), device=device)
        sampled = [not g for g in state.is_greedy]
        unseeded = [i for i, g in enumerate(state.generators) if g is None and sampled[i]]

        def fill(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
            return t.exponential_(generator=g) if exponential else t.uniform_(generator=g)

        if unseeded:
            gen = self.generator
            rows = torch.empty((len(unseeded), *shape), device=gen.device if gen is not None else device)
            out[torch.tensor(unseeded, device=device)] = fill(rows, gen).to(device)
        for i, g in enumerate(state.generators):
            if g is not None and sampled[i]:
                out[i] = fill(torch.empty(shape, device=g.device), g).to(device)
        return out

    def sample_from_probs(self, probs: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """One token per row [B] drawn from `probs` by the exponential race (greedy rows: argmax, no RNG used)."""
        if state.all_greedy:
            return probs.argmax(dim=-1)
        noise = self._draw(state, (probs.shape[-1],), probs.device, exponential=True)
        # Exp(1) draws are > 0 in practice; the clamp only keeps a freak 0 from producing 0/0
        race = probs / noise.clamp_min(1e-30)
        return torch.where(state.greedy, probs.argmax(dim=-1), race.argmax(dim=-1))

    def uniform(self, state: SamplingState, n: int = 1) -> torch.Tensor:
        """[B, n] uniforms in [0, 1) from the same per-row generators (speculative decoding's acceptance test).
        Greedy rows draw nothing and hold 1.0: their drafts are accepted by exact match, not by chance."""
        return self._draw(state, (n,), state.temperature.device, exponential=False)

    def sample(self, logits: torch.Tensor, state: SamplingState) -> SamplerOutput:
        probs = self.probs(logits, state)
        sampled = self.sample_from_probs(probs, state)
        token_ids = sampled.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        rows = [i for i, k in enumerate(state.logprobs) if k is not None]
        if rows:
            k_max = max(k for k in state.logprobs if k is not None)
            idx = torch.tensor(rows, device=logits.device)
            for i, lp in zip(rows, compute_logprobs(logits[idx], sampled[idx], k_max), strict=True):
                lp.top = lp.top[: state.logprobs[i]]
                logprobs[i] = lp
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)
