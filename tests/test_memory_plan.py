"""deploy/memory_plan.py counts what the network really holds: its cache bytes per token are KVCache's, and its
parameter count is the network's, for GLM-5 itself and for a small DeepSeek-V3-layout config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model.batch import KVCache
from model.config import ModelConfig
from model.network import GlmMoeDsaForCausalLM

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", DEPLOY / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GLM5 = json.loads((DEPLOY / "glm5-fp8" / "config.json").read_text())
SMALL_DSV3 = {**{k: v for k, v in GLM5.items() if not k.startswith("index")}, "model_type": "deepseek_v3",
              "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 320, "hidden_size": 64,
              "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "n_routed_experts": 8, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16,
              "qk_rope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1}


@pytest.mark.parametrize("raw", [GLM5, SMALL_DSV3], ids=["glm5", "deepseek_v3"])
def test_plan_matches_the_network(raw):
    mp = memory_plan()
    p = mp.plan(raw, 1, "bf16", mp.H200_MIB, 0)
    cfg = ModelConfig.from_dict(raw)
    assert p["kv_bytes_per_token"] == KVCache.bytes_per_token(cfg, torch.bfloat16)
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(cfg)
    held = sum(t.numel() for t in model.state_dict().values())
    assert round(p["total_params_b"] * 1e9) == held

