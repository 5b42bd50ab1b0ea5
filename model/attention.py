"""Multi-head Latent Attention over the latent cache, with DSA top-k selection.

Per token only the normed latent c_kv (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim) are
cached. Decode, verification and sparse attention use the absorbed (MQA) form: W_UK is folded into the query
(q~_h = W_UK,h^T q_h^nope scores directly against c_kv) and W_UV is applied after the weighted sum of latents,
so keys and values are never expanded. Dense attention of long query blocks (prefill chunks) expands the
context's latents into per-head keys and values instead, which is cheaper there. Both are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .batch import PREFILL_MIN_QUERIES, ForwardBatch
from .config import ModelConfig
from .indexer import Indexer
from .kv_cache import Store
from .layers import ColumnParallelLinear, ReplicatedLinear, RMSNorm, RotaryTable, RowParallelLinear

# Sparse attention gathers each query's top-k latents ([B, Q, k, C] floats) when that fits this many elements
# (decode, verify and prefill chunks of small models); otherwise it masks the dense scores, which costs
# O(T) per query but no [Q, k] copy. Training always masks: its KL loss needs the dense distribution.
SPARSE_GATHER_MAX_ELEMENTS = 1 << 26
# ...unless a long query block reads a short context (T < this x k, e.g. a batch of fresh 128-token prompts with
# k = 64): there Q*k gathered rows cost more than the masked dense scores (16 x 128-token prompts: 387 -> 272 ms;
# at T = 8k the gather wins again, 76 vs 86 ms). Decode and verification always gather.
GATHER_MIN_CONTEXT_RATIO = 4

# Dense attention of a sequence with at least this many queries (a prefill chunk) uses the expanded form (a batch
# never holds such blocks beside shorter ones: model/batch.py attends those in groups).
EXPAND_MIN_QUERIES = PREFILL_MIN_QUERIES

TopK = torch.Tensor | list[torch.Tensor | None] | None  # one per group of a grouped batch


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = parallel.local_size(cfg.num_attention_heads, "num_attention_heads")  # this rank's heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.attention_scale
        self.interleave = cfg.rope_interleave
        bias = cfg.attention_bias
        H, nh = cfg.hidden_size, cfg.num_attention_heads  # the projections take global sizes and shard themselves
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(H, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, nh * cfg.qk_head_dim)
        else:
            self.q_proj = ColumnParallelLinear(H, nh * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(H, cfg.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, nh * (self.nope + self.v_dim))
        # The absorbed attention reads it per head through bmm, slower from a transposed layout at GLM-5's
        # kv_lora_rank of 512 (model/cpu_layout.py)
        self.kv_b_proj.keep_layout = True
        self.o_proj = RowParallelLinear(nh * self.v_dim, H, bias=bias)
        self.indexer = Indexer(cfg, layer) if cfg.use_indexer and cfg.has_own_indexer(layer) else None

    def forward(self, x: torch.Tensor, rope: RotaryTable, fb: ForwardBatch,
                prev_topk: TopK = None) -> tuple[torch.Tensor, TopK]:
        """x: [N, hidden] -> ([N, hidden], this layer's top-k indices for a following shared-indexer layer: one
        tensor [B, Q, k], or one per group of `fb.groups`)."""
        N, nh = x.shape[0], self.n_heads
        if hasattr(self, "q_a_proj"):
            q_lat = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_lat)
        else:
            q_lat, q = None, self.q_proj(x)
        q_nope, q_rope = q.view(N, nh, -1).split([self.nope, self.rope], dim=-1)
        q_rope = rope.rotate(q_rope, self.interleave)
        latent, index_k = self.cache_entries(x, rope)
        if fb.cache is not None:  # written before any read: a query attends its own token too
            self._write(fb, latent, index_k)
        index_q = index_w = None
        if self.indexer is not None and self.indexer.needed(fb):
            index_q, index_w = self.indexer.queries(x, q_lat, rope)

        parts = (q_nope, q_rope, latent, index_k, index_q, index_w)
        if fb.groups is None:
            o, topk = self._attend(*parts, fb, prev_topk)
        else:  # a mixed batch, attended group by group (see ForwardBatch.groups); every token is in one group
            o, topk = q.new_empty(N, nh, self.v_dim), []
            for i, g in enumerate(fb.groups):
                sel = g.token_index
                o_g, t = self._attend(*(p[sel] if p is not None else None for p in parts), g,
                                      prev_topk[i] if prev_topk is not None else None)
                o[sel] = o_g
                topk.append(t)
        return self.o_proj(o.reshape(N, nh * self.v_dim)), topk

    def cache_entries(self, x: torch.Tensor, rope: RotaryTable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What this layer caches for x: the latent [N, kv_rank + rope] and the indexer key (if it has one)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), rope.rotate(k_rope, self.interleave)], dim=-1)
        return latent, self.indexer.keys(x, rope) if self.indexer is not None else None

    def write_cache(self, x: torch.Tensor, rope: RotaryTable, fb: ForwardBatch) -> None:
        """Only the cache entries `forward` would write for x, without attending (the MTP layer's catch-up)."""
        self._write(fb, *self.cache_entries(x, rope))

    def _write(self, fb: ForwardBatch, latent: torch.Tensor, index_k: torch.Tensor | None) -> None:
        fb.cache.write(Store.LATENT, self.layer, fb.slot_mapping, latent)
        if index_k is not None:
            fb.cache.write(Store.INDEX_KEY, self.layer, fb.slot_mapping, index_k)

    def _attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, index_k: torch.Tensor | None,
                index_q: torch.Tensor | None, index_w: torch.Tensor | None, fb: ForwardBatch,
                prev_topk: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the batch's queries over their contexts: ([N, nh, v_dim] outputs, top-k)."""
        topk, index_scores = prev_topk, None
        if self.indexer is not None:
            topk, index_scores = None, None
            if index_q is not None:
                topk, index_scores = self.indexer.select(index_q, index_w, index_k, fb)
        B, Q = fb.num_seqs, max(fb.query_lens)
        if topk is None and not fb.collecting(self.layer) and Q >= EXPAND_MIN_QUERIES:
            return self._attend_expanded(q_nope, q_rope, latent, fb), None
        nh, dtype = self.n_heads, q_nope.dtype
        w_kv = self.kv_b_proj.weight.view(nh, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]
        # Absorbed: W_UK folded into the query, W_UV applied after the weighted sum of latents. Plain (batched)
        # matmuls rather than einsum: on CPU einsum's own dispatch costs more than these tiny products.
        q_abs = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [N, nh, kv_rank]
        qp = fb.to_padded(torch.cat([q_abs, q_rope], dim=-1)).float()  # [B, Q, nh, C]
        if topk is not None and self._gather(topk, fb, latent.shape[-1]):
            # Read only the selected latents from the cache: O(k) per query instead of O(T).
            keys = fb.context(Store.LATENT, self.layer, latent, topk).float()  # [B, Q, k, C]
            masked_out = fb.masked_out_at(topk)[:, :, None]  # [B, Q, 1, k]
            scores = torch.matmul(qp, keys.transpose(-1, -2)) * self.scale  # [B, Q, nh, k]
            probs = torch.softmax(scores.masked_fill(masked_out, float("-inf")), dim=-1)
            o_lat = torch.matmul(probs, keys[..., : self.kv_rank])  # [B, Q, nh, kv_rank]
        else:
            ctx32 = fb.context(Store.LATENT, self.layer, latent).float()  # [B, T, C]
            masked_out = fb.masked_out
            if topk is not None:  # also hide every key outside the top-k
                masked_out = masked_out | torch.ones_like(masked_out).scatter_(2, topk, False)
            scores = torch.bmm(qp.flatten(1, 2), ctx32.transpose(1, 2)).view(B, Q, nh, -1) * self.scale
            probs = torch.softmax(scores.masked_fill(masked_out[:, :, None], float("-inf")), dim=-1)
            o_lat = torch.bmm(probs.flatten(1, 2), ctx32[..., : self.kv_rank]).view(B, Q, nh, -1)
            if fb.collecting(self.layer):
                fb.collect.append({"layer": self.layer, "attn": probs.transpose(1, 2), "index": index_scores,
                                   "topk": topk})
        o_lat = fb.to_flat(o_lat.to(dtype))  # [N, nh, kv_rank]
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [N, nh, v_dim]
        if fb.collecting(self.layer):
            fb.collect[-1]["out"] = o  # per-head outputs, for the copy-readout loss (model/attn_supervision.py)
        return o, topk

    def _gather(self, topk: torch.Tensor, fb: ForwardBatch, width: int) -> bool:
        """Whether top-k attention reads the selected latents (else it masks the dense scores); see above."""
        _, Q, k = topk.shape
        return (not fb.collecting(self.layer) and topk.numel() * width <= SPARSE_GATHER_MAX_ELEMENTS
                and (Q < EXPAND_MIN_QUERIES or fb.num_keys >= GATHER_MIN_CONTEXT_RATIO * k))

    def _attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, fb: ForwardBatch
                         ) -> torch.Tensor:
        """Dense attention for long query blocks in the expanded (plain multi-head) form: the context's latents
        are decompressed once into per-head keys and values, then scaled-dot-product attention (a fused kernel
        that never holds the [Q, T] scores) runs at head dim nope + rope instead of the absorbed kv_rank + rope.
        The same result; cheaper once a sequence has many queries (vLLM's MLA prefill does the same)."""
        nh, C, R = self.n_heads, self.kv_rank, self.rope
        ctx = fb.context(Store.LATENT, self.layer, latent)  # [B, T, C + R]
        B, T = ctx.shape[:2]
        kv = self.kv_b_proj(ctx[..., :C]).view(B, T, nh, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, ctx[:, :, None, C:].expand(B, T, nh, R)], dim=-1)  # [B, T, nh, nope + R]
        q = fb.to_padded(torch.cat([q_nope, q_rope], dim=-1))  # [B, Q, nh, nope + R]
        # SDPA's fused kernel wants one head dim for q, k and v, else it takes the unfused math path (2x slower
        # on CPU here): zero-pad the narrower side (zeros change neither q.k nor the kept output columns).
        D = max(q.shape[-1], self.v_dim)
        q, k, v = (F.pad(t, (0, D - t.shape[-1])) if t.shape[-1] < D else t for t in (q, k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                           v.transpose(1, 2).float(), attn_mask=fb.attend_mask[:, None],
                                           scale=self.scale)  # [B, nh, Q, D]
        return fb.to_flat(o[..., : self.v_dim].transpose(1, 2).to(q_nope.dtype))
