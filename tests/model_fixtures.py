"""Tiny random GlmMoeDsa checkpoints written by transformers (the oracle), with an MTP layer added the way
docs/ARCHITECTURE.md describes ("Making a tiny test checkpoint"): build L+1 layers, save, declare L layers + 1
MTP layer, add the MTP-only tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, index_topk=8,
    index_head_dim=16, index_n_heads=8, first_k_dense_replace=1, max_position_embeddings=512,
    rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, initializer_range=0.1, eos_token_id=1,
    bos_token_id=0,
)


def make_checkpoint(path: Path, *, mtp: bool = True, shard_size: str | None = None, seed: int = 0,
                    **overrides) -> Path:
    """Write a random checkpoint with transformers and return its directory."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    kw = {**TINY, **overrides}
    L = kw["num_hidden_layers"]
    torch.manual_seed(seed)
    cfg = GlmMoeDsaConfig(**{**kw, "num_hidden_layers": L + 1 if mtp else L})
    model = GlmMoeDsaForCausalLM(cfg).eval()
    with torch.no_grad():  # a non-zero selection bias, so "bias only selects" is exercised
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.2)
    save_kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **save_kw)
    if mtp:
        _declare_mtp(path, kw["hidden_size"], L, seed)
    return path


def _declare_mtp(path: Path, hidden: int, L: int, seed: int) -> None:
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_hidden_layers"] = L
    cfg["num_nextn_predict_layers"] = 1
    for key in ("mlp_layer_types", "layer_types", "indexer_types"):
        cfg.pop(key, None)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed + 1)
    extra = {
        f"model.layers.{L}.enorm.weight": 1.0 + 0.1 * torch.randn(hidden, generator=g),
        f"model.layers.{L}.hnorm.weight": 1.0 + 0.1 * torch.randn(hidden, generator=g),
        f"model.layers.{L}.shared_head.norm.weight": 1.0 + 0.1 * torch.randn(hidden, generator=g),
        f"model.layers.{L}.eh_proj.weight": 0.1 * torch.randn(hidden, 2 * hidden, generator=g),
    }
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        save_file(extra, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
        data["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
        index.write_text(json.dumps(data, indent=2))
    else:
        tensors = load_file(str(path / "model.safetensors"))
        tensors.update(extra)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


class _TieBreakingFunctional:
    """torch.nn.functional as transformers' GlmMoeDsa module sees it, but with the indexer's ReLU (the module's
    only `F.relu`) given glm-serve's documented floor (model/indexer.py: `relu_floor`). Which of several keys
    scored exactly 0 the oracle's `topk` keeps is its kernel's choice: neither the earliest nor the latest, and
    it changes with the row's length, so its own prefill and decode disagree. The oracle breaks those ties by
    the same documented rule; everything else stays transformers' own."""

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        from model.indexer import relu_floor

        return torch.maximum(x, relu_floor(x.shape[-1], x.device))


def pin_index_ties() -> None:
    """Give transformers' GlmMoeDsa indexer the floor (above); idempotent, process-wide."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa

    if not isinstance(modeling_glm_moe_dsa.F, _TieBreakingFunctional):
        modeling_glm_moe_dsa.F = _TieBreakingFunctional()


def hf_model(path: Path):
    """The transformers oracle, eager attention and eager experts, fp32, ties in the DSA top-k broken by position
    (`pin_index_ties`)."""
    from transformers import GlmMoeDsaForCausalLM

    pin_index_ties()
    return GlmMoeDsaForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()
