"""ModelConfig's defaults are transformers' GlmMoeDsaConfig defaults, and from_dict applies exactly those."""

from __future__ import annotations

from dataclasses import MISSING, fields

from model.config import ModelConfig

# Ours only: transformers' GlmMoeDsaConfig has no such attribute (GLM-5 checkpoints state them; the defaults
# are GLM-5's behaviour). The test checks transformers really lacks each, so this list cannot hide a field.
OURS_ONLY = {"scoring_func", "topk_method", "rope_interleave", "indexer_rope_interleave", "num_nextn_predict_layers",
             "raw"}
# Deliberately not transformers' placeholders bos 0 / eos 1 (see ModelConfig): a checkpoint naming no end token
# must not stop generating at token 1.
TOKEN_IDS = {"bos_token_id", "eos_token_id"}


def _theirs(name: str, theirs) -> object:
    """transformers' default of our field `name`, in our representation."""
    if name == "rope_theta":
        return theirs.rope_parameters["rope_theta"]
    if name == "rope_scaling":  # ours: None for default RoPE
        return None if theirs.rope_parameters.get("rope_type", "default") == "default" else theirs.rope_parameters
    if name == "torch_dtype":
        return theirs.dtype
    return getattr(theirs, name)


def test_defaults_equal_transformers_glm_moe_dsa_config_field_by_field():
    from transformers import GlmMoeDsaConfig

    theirs = GlmMoeDsaConfig()
    required = [f.name for f in fields(ModelConfig) if f.default is MISSING and f.default_factory is MISSING]
    # from_dict with only the required fields (transformers' values) must fill every other field with its default.
    ours = ModelConfig.from_dict({"architectures": ["GlmMoeDsaForCausalLM"],
                                  **{name: getattr(theirs, name) for name in required}})
    checked = []
    for f in fields(ModelConfig):
        if f.name in OURS_ONLY:
            assert not hasattr(theirs, f.name), f"transformers now has {f.name}: compare it"
            continue
        if f.name in TOKEN_IDS:
            assert getattr(ours, f.name) in (None, []), f.name
            continue
        if f.name in ("indexer_types", "mlp_layer_types"):  # ours: empty means derived, as transformers derives
            continue
        assert getattr(ours, f.name) == _theirs(f.name, theirs), f.name
        checked.append(f.name)
    assert {"n_shared_experts", "routed_scaling_factor", "max_position_embeddings", "q_lora_rank",
            "first_k_dense_replace"} <= set(checked)
    # The derived per-layer patterns agree with the lists transformers derives.
    L = theirs.num_hidden_layers
    assert [ours.is_moe_layer(i) for i in range(L)] == [t == "sparse" for t in theirs.mlp_layer_types]
    assert [ours.has_own_indexer(i) for i in range(L)] == [t == "full" for t in theirs.indexer_types]


def test_explicit_null_q_lora_rank_means_no_query_compression():
    from transformers import GlmMoeDsaConfig

    theirs = GlmMoeDsaConfig()
    required = [f.name for f in fields(ModelConfig) if f.default is MISSING and f.default_factory is MISSING]
    d = {"architectures": ["DeepseekV3ForCausalLM"], **{name: getattr(theirs, name) for name in required}}
    assert ModelConfig.from_dict({**d, "q_lora_rank": None}).q_lora_rank is None
    assert ModelConfig.from_dict(d).q_lora_rank == 2048
