"""DeepSeek-V3 (GLM-5's parent: MLA + MoE, no indexer) loads and matches transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from model.batch import ForwardBatch
from model.loader import load_model


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_deepseek_v3_logits_match_transformers(tmp_path, q_lora_rank):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=1, n_group=4, topk_group=2, initializer_range=0.1, max_position_embeddings=512)
    DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()(ids[None]).logits[0]
    ours = load_model(tmp_path)
    assert not ours.config.use_indexer and not ours.has_mtp
    with torch.inference_mode():
        got = ours.logits(ours(ids, ForwardBatch.single(30)))
    assert (got - ref).abs().max().item() <= 1e-4
