"""DSA lightning indexer: picks, for every query, the `index_topk` past tokens the main attention may read.

I(p, s) = sum_j w_j(p) * ReLU(u_j(p) . k(s) / sqrt(d)), with a LayerNorm'd key k cached per token (the only
indexer state), few heads, and fp32 scoring; the ReLU's floor is a tiny per-position tie-breaker (`relu_floor`).
Contexts no longer than `index_topk` are dense by definition, so scoring is skipped there unless training asks
for the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import Store
from .layers import ReplicatedLinear, RotaryTable

# Score all heads in one matmul while the [B, Q, H, T] intermediate stays this small; else head by head.
ALL_HEADS_MAX_ELEMENTS = 1 << 22
# Longer blocks score a tile of queries at a time, [B, tile, T] of about this many floats (a few MB: cache-sized).
TILE_ELEMENTS = 1 << 20


# The ReLU's floor, per key position p: (2^23 + p) * 2^-120, in [2^-97, 2^-96), rising with p, exact in fp32 below
# 2^23 positions. A plain ReLU scores every key on the wrong side of a head exactly 0, and with few heads dozens of
# keys can tie at the k-th place; `topk` leaves ties to its kernel, so a decode step, a verify step and a prefill of
# the same text read different keys (a trained 8-layer model had 37-84 keys tied at 0 in 3 of its 8 layers at 134
# tokens, and its greedy MTP output parted from K = 0's). With this floor those keys differ by position (the later
# ones first when the head weight is positive) and the choice is a function of the scores alone; a score moves by
# under 2^-96.
MAX_FLOOR_POSITIONS = 1 << 23
_floors: dict[torch.device, torch.Tensor] = {}


def relu_floor(length: int, device: torch.device) -> torch.Tensor:
    """The floor of the first `length` key positions [length] (fp32), cached per device."""
    floor = _floors.get(device)
    if floor is None or floor.numel() < length:
        if length > MAX_FLOOR_POSITIONS:
            raise ValueError(f"the indexer's tie-breaking floor is exact up to {MAX_FLOOR_POSITIONS} positions")
        n = min(MAX_FLOOR_POSITIONS, max(4096, 1 << (length - 1).bit_length()))
        with torch.inference_mode(False):  # a tensor made in the engine's inference mode would refuse training
            floor = (torch.arange(n, device=device, dtype=torch.float32) + MAX_FLOOR_POSITIONS) * 2.0**-120
        _floors[device] = floor
    return floor[:length]


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.interleave = cfg.indexer_rope_interleave
        self.wq_b = ReplicatedLinear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = ReplicatedLinear(cfg.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = ReplicatedLinear(cfg.hidden_size, self.n_heads)

    def _tiles(self, qp: torch.Tensor, wp: torch.Tensor, keys_t: torch.Tensor,
               key_limit: Callable[[int, int], int] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """sum_h w_h * ReLU(q_h . k) for long query blocks, a tile of queries at a time with the heads summed in
        place: yields (q0, q1, scores [B, q1 - q0, T']) in one reused, cache-sized buffer, instead of [B, Q, H, T]
        (or [B, Q, T] per op) streaming through memory: the prefill indexer is bound by those passes, not FLOPs.
        With `key_limit(q0, q1)` a tile scores only the keys before it (T' <= T; causally later keys are hidden
        from the tile anyway), skipping the future half of a prefill chunk's own keys, as causal flash attention
        skips blocks."""
        B, Q, H, _ = qp.shape
        T = keys_t.shape[-1]
        tile = max(1, min(Q, TILE_ELEMENTS // max(1, B * T)))
        buf, acc = torch.empty(B * tile * T, device=qp.device), torch.empty(B * tile * T, device=qp.device)
        for q0 in range(0, Q, tile):
            q1 = min(Q, q0 + tile)
            n = q1 - q0
            width = T if key_limit is None else min(T, max(key_limit(q0, q1), self.topk))
            s, out = buf[: B * n * width].view(B, n, width), acc[: B * n * width].view(B, n, width)
            k, floor = keys_t[..., :width], relu_floor(width, qp.device)
            for h in range(H):
                torch.maximum(torch.bmm(qp[:, q0:q1, h], k, out=s), floor, out=s)  # ReLU, ties broken
                if h == 0:
                    torch.mul(s, wp[:, q0:q1, h, None], out=out)
                else:
                    out.addcmul_(s, wp[:, q0:q1, h, None])
            yield q0, q1, out

    def _topk_tiled(self, qp: torch.Tensor, wp: torch.Tensor, keys_t: torch.Tensor, fb: ForwardBatch
                    ) -> torch.Tensor:
        """Top-k indices [B, Q, k] of long query blocks, each tile reduced to its top-k at once: no [B, Q, T]
        scores ever exist (at 16K context a 2048-query chunk would need 128 MB, fresh pages every layer)."""
        B, Q = qp.shape[:2]
        out = torch.empty(B, Q, self.topk, dtype=torch.long, device=qp.device)
        for q0, q1, scores in self._tiles(qp, wp, keys_t, fb.key_limit):
            masked_out = fb.masked_out_rows(q0, q1, scores.shape[-1])
            out[:, q0:q1] = scores.masked_fill_(masked_out, float("-inf")).topk(self.topk, dim=-1).indices
        return out

    def keys(self, x: torch.Tensor, rope: RotaryTable) -> torch.Tensor:
        """The cached key of every new token [N, D]. Inputs are detached here and in `queries`: the indexer learns
        only from its own KL loss."""
        return rope.rotate(self.k_norm(self.wk(x.detach())), self.interleave)  # the rope slice comes first here

    def queries(self, x: torch.Tensor, q_lat: torch.Tensor, rope: RotaryTable) -> tuple[torch.Tensor, torch.Tensor]:
        """Per new token: head queries [N, H, D] (with the 1/sqrt(d), applied to the few queries rather than the T
        keys) and head weights [N, H] (may be negative)."""
        N = x.shape[0]
        q = rope.rotate(self.wq_b(q_lat.detach()).view(N, self.n_heads, self.head_dim), self.interleave)
        return q * self.head_dim**-0.5, self.weights_proj(x.detach()).float() * self.n_heads**-0.5

    def needed(self, fb: ForwardBatch) -> bool:
        """Whether any query of the batch has more than index_topk keys (else attention is dense by definition)."""
        longest = max(fb.context_lens) if fb.cache is not None else max(fb.query_lens)
        return longest > self.topk or fb.collecting(self.layer)

    def select(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, fb: ForwardBatch
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For the batch's queries (q, w of its tokens; k their new keys, already written): top-k indices [B, Q, k]
        into the padded context, or None when dense; and the scores [B, Q, T] when computed."""
        if not self.needed(fb):
            return None, None
        keys = fb.context(Store.INDEX_KEY, self.layer, k)  # [B, T, D]
        T = keys.shape[1]
        qp, wp = fb.to_padded(q).float(), fb.to_padded(w)  # [B, Q, H, D], [B, Q, H]
        keys_t = keys.float().transpose(1, 2)  # [B, D, T]; fp32 models: no copy
        B, Q = qp.shape[:2]
        # decode / verify, and training (the tiles write into reused buffers, which autograd cannot follow):
        # all heads in one matmul
        if B * Q * self.n_heads * T <= ALL_HEADS_MAX_ELEMENTS or (torch.is_grad_enabled() and qp.requires_grad):
            s = torch.maximum(torch.bmm(qp.flatten(1, 2), keys_t), relu_floor(T, qp.device))  # ReLU, ties broken
            s = s.view(B * Q, self.n_heads, T)
            scores = torch.bmm(wp.reshape(B * Q, 1, self.n_heads), s).view(B, Q, T)
        elif not fb.collecting(self.layer) and T > self.topk:  # long query blocks at inference: only the top-k is kept
            return self._topk_tiled(qp, wp, keys_t, fb), None
        else:  # long query blocks whose scores training wants (the indexer's KL loss)
            scores = torch.empty(B, Q, T, device=qp.device)
            for q0, q1, tile in self._tiles(qp, wp, keys_t):
                scores[:, q0:q1] = tile
        scores = scores.masked_fill_(fb.masked_out, float("-inf"))
        if T <= self.topk:
            return None, scores
        return scores.topk(self.topk, dim=-1).indices, scores
