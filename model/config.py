"""The model configuration, read from a Hugging Face `config.json` (`model_type: glm_moe_dsa`).

Every field of GLM-5's config is read, including those transformers ignores (`num_nextn_predict_layers`,
`rope_interleave`, `indexer_rope_interleave`, `scoring_func`). DeepSeek-V3 (`deepseek_v3`: MLA + MoE, no
indexer) reads through the same class with `use_indexer = False`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


class ConfigError(ValueError):
    """A config.json that glm-serve cannot serve: names the file and the field."""


@dataclass
class ModelConfig:
    """Fields without a default must be in config.json. The others default, here and only here, to transformers'
    `GlmMoeDsaConfig` defaults (GLM-5's own values; a test keeps them equal), except the token ids (see below);
    fields transformers does not know default to GLM-5's behaviour."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = 2048  # an explicit null: queries are projected without a low-rank step
    first_k_dense_replace: int = 3
    model_type: str = "glm_moe_dsa"
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    indexer_rope_interleave: bool = True
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_types: list[str] = field(default_factory=list)  # empty: every layer "full" (transformers' default)
    mlp_layer_types: list[str] = field(default_factory=list)  # empty: from first_k_dense_replace, as transformers
    num_nextn_predict_layers: int = 0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Not transformers' placeholder ids 0 and 1: a checkpoint that names no end token must not stop on token 1.
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def use_indexer(self) -> bool:
        return self.model_type == "glm_moe_dsa"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer for MLA: the normed latent and the rotated shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def num_cache_layers(self) -> int:
        """Main decoder layers plus the MTP layers, each with its own cache."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer: int) -> bool:
        if layer < len(self.mlp_layer_types):
            return self.mlp_layer_types[layer] == "sparse"
        return layer >= self.first_k_dense_replace

    def has_own_indexer(self, layer: int) -> bool:
        """GLM-5.2's IndexShare: a "shared" layer reuses the previous full layer's top-k."""
        if not self.use_indexer:
            return False
        if layer < len(self.indexer_types):
            return self.indexer_types[layer] == "full"
        return True

    @property
    def attention_scale(self) -> float:
        """softmax scale (dn + dr)^-1/2 (default RoPE has no mscale)."""
        return self.qk_head_dim**-0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        def need(name: str, kind: type | tuple[type, ...] = int) -> Any:
            if name not in d:
                raise ConfigError(f"{source}: missing required field '{name}'")
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ConfigError(f"{source}: field '{name}' must be {_kind_name(kind)}, got {v!r}")
            if isinstance(v, int) and v <= 0:
                raise ConfigError(f"{source}: field '{name}' must be positive, got {v!r}")
            return v

        def opt(name: str, kind: type | tuple[type, ...]) -> Any:
            default = _default(name)
            v = d.get(name, default)
            if v is None:
                return default
            if kind is not bool and isinstance(v, bool) or not isinstance(v, kind):
                raise ConfigError(f"{source}: field '{name}' must be {_kind_name(kind)}, got {v!r}")
            return v

        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        known_arch = isinstance(archs, list) and any(a in SUPPORTED for a in archs)
        if not known_arch and model_type not in SUPPORTED.values():
            raise ConfigError(
                f"{source}: field 'architectures' is {archs!r} (model_type {model_type!r}); "
                f"glm-serve supports {sorted(SUPPORTED)}"
            )
        if model_type is None:
            model_type = next(SUPPORTED[a] for a in archs if a in SUPPORTED)
        if model_type not in SUPPORTED.values():
            expected = sorted(SUPPORTED.values())
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; expected one of {expected}")

        rope = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling")
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        theta = rope.get("rope_theta", d.get("rope_theta", _default("rope_theta")))
        if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
            raise ConfigError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
        if rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: field 'rope_scaling' {rope_scaling!r}: only default RoPE is supported")

        eos = d.get("eos_token_id")
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        num_layers = need("num_hidden_layers")
        scoring = opt("scoring_func", str)
        if scoring not in ("sigmoid", "softmax"):
            raise ConfigError(f"{source}: field 'scoring_func' must be 'sigmoid' or 'softmax', got {scoring!r}")
        cfg = cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=need("num_attention_heads"),
            n_routed_experts=need("n_routed_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            kv_lora_rank=need("kv_lora_rank"),
            q_lora_rank=None if "q_lora_rank" in d and d["q_lora_rank"] is None else opt("q_lora_rank", int),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            first_k_dense_replace=opt("first_k_dense_replace", int),
            n_shared_experts=opt("n_shared_experts", int),
            n_group=opt("n_group", int),
            topk_group=opt("topk_group", int),
            routed_scaling_factor=float(opt("routed_scaling_factor", (int, float))),
            norm_topk_prob=opt("norm_topk_prob", bool),
            scoring_func=scoring,
            topk_method=opt("topk_method", str),
            hidden_act=opt("hidden_act", str),
            rms_norm_eps=float(opt("rms_norm_eps", (int, float))),
            max_position_embeddings=opt("max_position_embeddings", int),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rope_interleave=opt("rope_interleave", bool),
            indexer_rope_interleave=opt("indexer_rope_interleave", bool),
            index_topk=opt("index_topk", int),
            index_head_dim=opt("index_head_dim", int),
            index_n_heads=opt("index_n_heads", int),
            indexer_types=list(opt("indexer_types", list)),
            mlp_layer_types=list(opt("mlp_layer_types", list)),
            num_nextn_predict_layers=opt("num_nextn_predict_layers", int),
            attention_bias=opt("attention_bias", bool),
            tie_word_embeddings=opt("tie_word_embeddings", bool),
            initializer_range=float(opt("initializer_range", (int, float))),
            bos_token_id=opt("bos_token_id", int),
            eos_token_id=eos_list,
            pad_token_id=opt("pad_token_id", int),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
            raw=dict(d),
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' exceeds n_routed_experts")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ConfigError(f"{source}: fields 'n_group'/'topk_group' do not divide the experts")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{source}: field 'qk_rope_head_dim' must be even")
        if self.use_indexer and self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(f"{source}: field 'index_head_dim' must be >= qk_rope_head_dim")
        for name, values, allowed in (
            ("indexer_types", self.indexer_types, {"full", "shared"}),
            ("mlp_layer_types", self.mlp_layer_types, {"dense", "sparse"}),
        ):
            if values and (len(values) < self.num_hidden_layers or not set(values) <= allowed):
                raise ConfigError(f"{source}: field '{name}' must list {sorted(allowed)} for every layer")
        if self.indexer_types and self.indexer_types[0] != "full":
            raise ConfigError(f"{source}: field 'indexer_types' must start with 'full'")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{file}: not found (a checkpoint directory needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_dict(data, str(file))


def _default(name: str) -> Any:
    """The dataclass default of an optional field (a fresh one for list fields)."""
    f = next(f for f in fields(ModelConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
