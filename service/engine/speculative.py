"""MTP speculative decoding: the model's own MTP layer drafts K tokens, the main model verifies them in one
forward, exact rejection sampling keeps the output distribution that of plain decoding.

Conventions (reference §3.8, GLM's NextN):
- The MTP cache entry at position i is the MTP layer run on (h_i, t_{i+1}): the main model's final-normed
  hidden state at i and the token after it, at position i. Every step, once the step's tokens are known, the
  MTP layer catches up over exactly the positions the main model newly validated, so both caches always
  cover the same positions (while the policy drafts nothing, the catch-up is deferred and batched, see
  MTPProposer); a preempted sequence recomputes both. An entry depends only on the layer's input, so the
  catch-up only writes entries (`mtp_fill_cache`: no attention, no MoE), except for a sequence that drafts: its
  last position's output is the first draft's input, and in a small batch the few new positions of a verify step
  run through the whole layer together with that one (one forward instead of two).
- Draft step 1 reads the MTP output at the last valid position; step k > 1 feeds the previous step's output
  (already `shared_head.norm`-ed, like the main model's output) and the previous draft, at the next position.
  Those speculative MTP entries lie past the valid length and are overwritten by the next catch-up.
- Verification accepts draft j with probability min(1, p_j(d_j) / q_j(d_j)) and on the first rejection
  resamples from norm(max(0, p_j - q_j)); if all drafts pass, a bonus token comes from p_K. p and q are the
  fully processed distributions (penalties with the draft history, temperature, top_k, top_p, min_p), so
  greedy rows (one-hot p and q) accept exactly the longest matching prefix.
- Requests with n > 1 decode without drafts (their choices share a prompt whose MTP entries would differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.batch import KVCache
from model.network import GlmMoeDsaForCausalLM

from .block_manager import BlockManager
from .outputs import TokenLogprob
from .sampler import Sampler, SamplingState, compute_logprobs
from .sequence import Sequence
from .step_inputs import StepInputs

if TYPE_CHECKING:
    from .cuda_graphs import GraphRunner


@dataclass
class Verdict:
    """Per verified sequence: accepted draft count, and the final distribution to draw one token from."""

    num_accepted: torch.Tensor  # [S] long
    final_probs: torch.Tensor  # [S, V]


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor, u: torch.Tensor,
           greedy: torch.Tensor) -> Verdict:
    """Exact rejection sampling, vectorised over S sequences padded to K drafts.

    p [S, K+1, V] target probs at each verified position; q [S, K, V] draft probs; drafts [S, K];
    num_drafts [S] (<= K, the rest is padding); u [S, K] uniforms; greedy [S] (accept by exact match).
    """
    S, K1, V = p.shape
    K = K1 - 1
    if K == 0:
        return Verdict(torch.zeros(S, dtype=torch.long, device=p.device), p[:, 0])
    d = drafts.clamp_min(0)[..., None]
    p_d = p[:, :K].gather(2, d).squeeze(2)
    q_d = q.gather(2, d).squeeze(2)
    ok = torch.where(greedy[:, None], p_d > 0, u * q_d < p_d)
    ok &= torch.arange(K, device=p.device)[None, :] < num_drafts[:, None]
    num_accepted = ok.long().cumprod(dim=1).sum(dim=1)  # the longest all-accepted prefix
    rows = torch.arange(S, device=p.device)
    p_at = p[rows, num_accepted]  # [S, V]: the target at the first rejected (or bonus) position
    rejected = num_accepted < num_drafts
    q_at = q[rows, num_accepted.clamp_max(K - 1)]
    residual = (p_at - q_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass; a rejection then has probability 0, fall back to p for safety
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)
    return Verdict(num_accepted, torch.where(rejected[:, None], residual, p_at))


@dataclass
class Verified:
    """One verified sequence: its new tokens (accepted drafts, then one more), their logprob entries if asked,
    and how many drafts it had."""

    seq: Sequence
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    num_drafts: int

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1


def verify_drafts(verifying: list[tuple[Sequence, int]], logits: torch.Tensor, sampler: Sampler,
                  num_speculative_tokens: int) -> list[Verified]:
    """Rejection-sample each sequence's drafts against the target distributions at its K+1 logits rows
    (`verifying`: sequence, its first row)."""
    seqs = [s for s, _ in verifying]
    if all(s.params.argmax_only for s in seqs):
        # Accept the longest prefix of drafts equal to the target argmax, then the argmax after it: the same
        # verdict as the rejection rule on one-hot p, without building p or q.
        best = logits.argmax(dim=-1).tolist()
        accepted = []
        for s, first in verifying:
            a = 0
            while a < len(s.draft_token_ids) and s.draft_token_ids[a] == best[first + a]:
                a += 1
            accepted.append(a)
        final = [best[first + a] for (_, first), a in zip(verifying, accepted, strict=True)]
    else:
        K = max(len(s.draft_token_ids) for s in seqs)
        V = logits.shape[-1]
        # Target rows: position j of a sequence sees the drafts before it in its penalty history; padding
        # repeats the last real row.
        idx, rows_of, drafts_seen = [], [], []
        for s, first in verifying:
            k = len(s.draft_token_ids)
            for j in range(K + 1):
                idx.append(first + min(j, k))
                rows_of.append(s)
                drafts_seen.append(min(j, k))
        device = logits.device
        p = sampler.probs(logits[torch.tensor(idx, device=device)],
                          SamplingState.of(rows_of, device, drafts_seen, seeded=False))
        drafts, q, counts = draft_tensors(seqs, V, device)
        state = SamplingState.of(seqs, device)
        # Every sampled sequence draws its configured number of uniforms whatever its drafts: a seeded
        # request's randomness stays independent of the batch.
        u = sampler.uniform(state, num_speculative_tokens)[:, :K]
        verdict = verify(p.view(len(seqs), K + 1, V), q, drafts, counts, u, state.greedy)
        final = sampler.sample_from_probs(verdict.final_probs, state).tolist()
        accepted = [int(a) for a in verdict.num_accepted]
    out = []
    for (s, first), a, last in zip(verifying, accepted, final, strict=True):
        tokens = s.draft_token_ids[:a] + [last]
        lps: list[TokenLogprob | None] = [None] * len(tokens)
        if s.params.logprobs is not None:
            lps = list(compute_logprobs(logits[first : first + a + 1], tokens, s.params.logprobs))
        out.append(Verified(s, tokens, lps, len(s.draft_token_ids)))
    return out


class MTPProposer:
    """Runs the MTP layer each step: catch-up over newly validated positions, then up to K recursive drafts.

    While the policy drafts nothing, the catch-up is deferred: each sequence keeps the main model's hidden rows
    of the positions whose MTP entries are not yet written (`Sequence.mtp_hidden`), and one MTP forward writes
    them when the sequence drafts again or has `defer_rows` of them: the same entries, written in fewer and
    larger batches, so drafting resumes exactly where it would have been.
    """

    defer_rows = 32  # per sequence; a flush of 32 rows costs about one MTP run of a decode step (CPU, batch 1)
    # When the drafting sequences have at most this many new positions before their last ones in all (a small
    # batch's verify step), those go through the MTP layer with the last ones: attention and MoE for a few extra
    # rows cost less than a separate write-only pass and its batch set-up. In a big batch they would cost more.
    fuse_rows = 4

    def __init__(self, model: GlmMoeDsaForCausalLM, cache: KVCache, sampler: Sampler, block_manager: BlockManager,
                 device: torch.device, num_speculative_tokens: int, graphs: GraphRunner | None = None) -> None:
        """graphs: the MTP layer's draft steps (one row per sequence) through CUDA graphs (cuda_graphs.py)."""
        self.model = model
        self.graphs = graphs
        self.cache = cache
        self.sampler = sampler
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.k = num_speculative_tokens
        self.depth = num_speculative_tokens  # this step's draft depth (the policy's choice)

    def eligible(self, seq: Sequence) -> bool:
        # Grammar-constrained rows draft nothing: a draft the grammar forbids would always be rejected, and
        # checking drafts needs matcher rollback on every rejection (bench/structured.py measures the cost).
        return seq.params.n == 1 and seq.grammar is None

    def draft_budget(self, seq: Sequence, max_model_len: int) -> int:
        """Drafts that can still be emitted: never past max_tokens or max_model_len (one slot is the bonus)."""
        left = min(seq.params.max_tokens - len(seq.output_token_ids), max_model_len - seq.num_tokens)
        return max(0, min(self.depth, left - 1))

    @torch.inference_mode()
    def propose(self, done: list[tuple[Sequence, int, int]], hidden: torch.Tensor, max_model_len: int,
                depth: int | None = None) -> None:
        """done: (sequence, computed positions before this step, first hidden row) for every live sequence of
        the step. Catches the MTP cache up (or defers it when `depth` is 0) and leaves fresh drafts of up to
        `depth` tokens (default K) on sequences now waiting to decode."""
        self.depth = self.k if depth is None else min(depth, self.k)
        dev = self.device
        new = [(seq, start, row) for seq, start, row in done if seq.num_computed_tokens > start]
        if not new:
            return
        # This step's hidden rows of every sequence, gathered once (a copy: deferred rows outlive the step).
        rows = [r for seq, start, row in new for r in range(row, row + seq.num_computed_tokens - start)]
        mine = hidden[torch.tensor(rows, device=dev)].split([seq.num_computed_tokens - start for seq, start, _ in new])
        fill = _Rows()  # positions whose MTP entries are only written
        last = _Rows()  # positions through the whole MTP layer: up to each drafting sequence's last, whose output
        # is the first draft's input
        drafting = []
        for (seq, start, _), h in zip(new, mine, strict=True):
            end = seq.num_computed_tokens
            # (shape[0], not len(): Tensor.__len__ costs ~3 us, and at depth 0 these lists grow to defer_rows)
            pending = sum(x.shape[0] for x in seq.mtp_hidden)
            if seq.num_mtp_tokens + pending != start:
                seq.mtp_hidden, pending = [], 0  # deferred rows that do not reach this step (not expected): afresh
            seq.mtp_hidden.append(h)
            first = end - pending - h.shape[0]
            if self.depth == 0 and end - first < self.defer_rows:
                continue  # deferred
            hs = torch.cat(seq.mtp_hidden) if len(seq.mtp_hidden) > 1 else seq.mtp_hidden[0]
            seq.mtp_hidden = []
            if self.depth > 0 and end == seq.num_tokens - 1 and self.draft_budget(seq, max_model_len) > 0:
                drafting.append((seq, first, end, hs))
            elif end > first:
                fill.add(seq, first, end, hs)
            if seq.num_mtp_tokens == first:  # valid MTP entries reach num_computed_tokens (prefix caching reads it)
                seq.num_mtp_tokens = end
                self.block_manager.mtp_written(seq, first)
        # The drafting sequences' positions before their last go through the whole MTP layer with it when they are
        # few in all (one forward instead of two: op overhead dominates a small batch), else they are only written.
        # With graphs never: the last rows alone are a uniform step that replays.
        fuse = self.graphs is None and sum(end - first - 1 for _, first, end, _ in drafting) <= self.fuse_rows
        for seq, first, end, hs in drafting:
            split = first if fuse else end - 1
            if split > first:
                fill.add(seq, first, split, hs[: split - first])
            last.add(seq, split, end, hs[split - first :])
        # Entries first: the drafting rows attend to them.
        if fill.seqs:
            self.model.mtp_fill_cache(fill.ids(dev), torch.cat(fill.hidden), fill.inputs(self).batch(self.cache))
        if drafting:
            z = self._mtp(last.ids(dev), torch.cat(last.hidden), last.inputs(self))
            if z.shape[0] > len(drafting):  # fused catch-up rows: keep each sequence's last
                ends = torch.tensor([b - a for a, b in last.spans], device=dev).cumsum(0) - 1
                z = z.index_select(0, ends)
            self._draft(last.seqs, z, max_model_len)

    def _draft(self, seqs: list[Sequence], z: torch.Tensor, max_model_len: int) -> None:
        dev = self.device
        budgets = [self.draft_budget(s, max_model_len) for s in seqs]
        for s in seqs:
            s.draft_token_ids, s.draft_probs = [], []
        active = list(range(len(seqs)))
        for step in range(max(budgets)):
            if step > 0:  # feed (previous output, previous draft) at the next position
                keep = []  # (sequence index, its row in z)
                for row, i in enumerate(active):
                    s = seqs[i]
                    need = len(s.draft_token_ids)  # the entry goes at num_computed + step - 1
                    if budgets[i] > step and self.block_manager.can_allocate(s, need):
                        self.block_manager.allocate(s, need)
                        keep.append((i, row))
                if not keep:
                    break
                active = [i for i, _ in keep]
                z = z[torch.tensor([row for _, row in keep], device=dev)]
                pos = [seqs[i].num_computed_tokens + step - 1 for i in active]
                slots = [slot for i, p in zip(active, pos, strict=True) for slot in seqs[i].slots([p], self.block_size)]
                step_inputs = self._batch([seqs[i] for i in active], pos, [1] * len(active), [p + 1 for p in pos],
                                          slots)
                prev = torch.tensor([seqs[i].draft_token_ids[-1] for i in active], device=dev)
                z = self._mtp(prev, z, step_inputs)
            batch = [seqs[i] for i in active]
            logits = self.model.mtp_logits(z)
            if all(s.params.argmax_only for s in batch):
                # Greedy drafts: argmax, no q (verification of greedy rows never reads it).
                tokens, q = logits.argmax(dim=-1).tolist(), [None] * len(batch)
            else:
                state = SamplingState.of(batch, dev, [len(s.draft_token_ids) for s in batch])
                q = self.sampler.probs(logits, state)
                tokens = self.sampler.sample_from_probs(q, state).tolist()
            for j, i in enumerate(active):
                seqs[i].draft_token_ids.append(tokens[j])
                seqs[i].draft_probs.append(q[j])

    def _mtp(self, ids: torch.Tensor, hidden: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """The MTP layer on `hidden` at `step`'s positions: replayed from a graph where one serves the step."""
        out = self.graphs.run(ids, step, hidden) if self.graphs is not None else None
        return out if out is not None else self.model.mtp(ids, hidden, step.batch(self.cache))

    def _batch(self, seqs: list[Sequence], positions: list[int], qlens: list[int], ctx: list[int],
               slots: list[int]) -> StepInputs:
        dev = self.device
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        return StepInputs(t(positions), qlens, ctx, t(tables), t(slots))


class _Rows:
    """MTP catch-up rows of several sequences: per sequence a run of positions [first, end) and their hidden rows."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.spans: list[tuple[int, int]] = []
        self.hidden: list[torch.Tensor] = []

    def add(self, seq: Sequence, first: int, end: int, hidden: torch.Tensor) -> None:
        self.seqs.append(seq)
        self.spans.append((first, end))
        self.hidden.append(hidden)

    def ids(self, device: torch.device) -> torch.Tensor:
        """The token after each position (the MTP input at position i is token i + 1)."""
        return torch.tensor([t for s, (a, b) in zip(self.seqs, self.spans, strict=True)
                             for t in s.token_ids(a + 1, b + 1)], device=device)

    def inputs(self, proposer: MTPProposer) -> StepInputs:
        positions = [p for a, b in self.spans for p in range(a, b)]
        slots = [x for s, (a, b) in zip(self.seqs, self.spans, strict=True) for x in s.slots(range(a, b),
                                                                                              proposer.block_size)]
        return proposer._batch(self.seqs, positions, [b - a for a, b in self.spans], [b for _, b in self.spans],
                               slots)


def draft_tensors(seqs: list[Sequence], vocab: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Pad the sequences' drafts to [S, K] ids, [S, K, V] probs and [S] counts."""
    K = max(len(s.draft_token_ids) for s in seqs)
    drafts = torch.full((len(seqs), K), -1, dtype=torch.long, device=device)
    q = torch.zeros((len(seqs), K, vocab), device=device)
    for i, s in enumerate(seqs):
        n = len(s.draft_token_ids)
        if n:
            drafts[i, :n] = torch.tensor(s.draft_token_ids, device=device)
            for j, qj in enumerate(s.draft_probs):
                if qj is not None:  # greedy drafts carry no q (their rows accept by exact match)
                    q[i, j] = qj
    counts = torch.tensor([len(s.draft_token_ids) for s in seqs], device=device)
    return drafts, q, counts


__all__ = ["MTPProposer", "Verdict", "Verified", "draft_tensors", "verify", "verify_drafts"]
