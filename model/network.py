"""The GLM-5 decoder (`GlmMoeDsaForCausalLM`) and its MTP layer, on the flat ragged batch of `ForwardBatch`.

Module names follow the Hugging Face checkpoint, so a state dict maps one to one except the experts, which are
stacked (see loader). The MTP layer sits at ``model.layers.{num_hidden_layers}`` as in the checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MLAttention
from .batch import ForwardBatch
from .config import ModelConfig
from .layers import MLP, PrepackedLinear, ReplicatedLinear, RMSNorm, Rotary, RotaryTable
from .moe import MoE
from .parallel import VocabParallelEmbedding, gather_last, vocab_parallel_head


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RotaryTable, fb: ForwardBatch,
                prev_topk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, topk = self.self_attn(self.input_layernorm(x), rope, fb, prev_topk)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, topk


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)


class MTPLayer(DecoderLayer):
    """Predicts token i+2 from the main model's (final-normed) hidden state at i and the embedding of token i+1.

    z = eh_proj([enorm(emb(t_{i+1})), hnorm(h_i)]); z' = decoder block(z); out = shared_head.norm(z').
    `out` feeds the shared LM head, and is also the hidden state carried into the next recursive draft step
    (GLM's convention: every step sees a normed state, like the main model's output it was trained on).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * H, H)
        self.shared_head = SharedHead(H, cfg.rms_norm_eps)

    def forward_mtp(self, emb: torch.Tensor, hidden: torch.Tensor, rope: RotaryTable, fb: ForwardBatch
                    ) -> torch.Tensor:
        z = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        z, _ = super().forward(z, rope, fb)
        return self.shared_head.norm(z)

    def fill_cache(self, emb: torch.Tensor, hidden: torch.Tensor, rope: RotaryTable, fb: ForwardBatch) -> None:
        """Write this layer's cache entries for the positions in `fb`, as forward_mtp would, and nothing else:
        an entry depends only on the layer's input, so the attention and MoE after it can be skipped."""
        z = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        self.self_attn.write_cache(self.input_layernorm(z), rope, fb)


class GlmModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(L)] + [MTPLayer(cfg, L + i) for i in range(cfg.num_mtp_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GlmMoeDsaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = GlmModel(cfg)
        self.lm_head = vocab_parallel_head(cfg.hidden_size, cfg.vocab_size)  # this rank's rows of the vocabulary
        self.tie_weights()
        self.rotary = Rotary(cfg.qk_rope_head_dim, cfg.rope_theta)
        self._head = PrepackedLinear()  # the LM head's product at CPU inference
        self._mtp_head = PrepackedLinear()  # only for an MTP head a checkpoint stores apart from lm_head

    def tie_weights(self) -> None:
        """tie_word_embeddings: the LM head is the embedding matrix (one parameter; checkpoints omit lm_head)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def has_mtp(self) -> bool:
        return self.config.num_mtp_layers > 0

    def forward(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """input_ids [N] -> final-normed hidden states [N, hidden] (apply `logits` to the rows you need)."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.table(fb.positions)
        topk = None
        for layer in self.model.layers[: self.config.num_hidden_layers]:
            x, topk = layer(x, rope, fb, topk)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_last(self._head(hidden, self.lm_head.weight).float(), self.config.vocab_size)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch, depth: int = 0) -> torch.Tensor:
        """One MTP step. next_ids [N]: the token after each position; hidden [N, H]: the main model's normed
        hidden state at that position (or the previous MTP step's output). Runs at the positions in `fb`
        (those of `hidden`), in the MTP layer's own cache. Returns the normed state for `logits`."""
        layer: MTPLayer = self.model.layers[self.config.num_hidden_layers + depth % self.config.num_mtp_layers]
        embed = getattr(layer, "embed_tokens", self.model.embed_tokens)
        return layer.forward_mtp(embed(next_ids), hidden, self.rotary.table(fb.positions), fb)

    def mtp_fill_cache(self, next_ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch, depth: int = 0) -> None:
        """Like `mtp`, but only writes the MTP layer's cache entries (no output): a catch-up that drafts nothing."""
        layer: MTPLayer = self.model.layers[self.config.num_hidden_layers + depth % self.config.num_mtp_layers]
        embed = getattr(layer, "embed_tokens", self.model.embed_tokens)
        layer.fill_cache(embed(next_ids), hidden, self.rotary.table(fb.positions), fb)

    def mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        layer = self.model.layers[self.config.num_hidden_layers + depth % self.config.num_mtp_layers]
        head = getattr(layer.shared_head, "head", self.lm_head)
        logits = (self._head if head is self.lm_head else self._mtp_head)(hidden, head.weight, head.bias).float()
        return gather_last(logits, self.config.vocab_size)
