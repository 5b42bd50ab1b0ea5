"""Cache bytes per token: MLA latent + DSA indexer key (what glm-serve caches) vs a plain multi-head KV cache of
the same model (full K and V of every head, as a non-absorbed MHA implementation would store them).

    python bench/cache_bytes.py [--model DIR ...]

Per layer, values per token: MLA = kv_lora_rank + qk_rope_head_dim; indexer = index_head_dim (layers with their
own indexer, and the MTP layers); plain MHA = heads x (qk_nope + qk_rope) for K + heads x v_head_dim for V. The
MTP layers count in both. The glm-serve figure is checked against the bytes `KVCache` really allocates. Rows:
the default model, the vLLM comparison checkpoint (DeepSeek-V3 layout) and real GLM-5 (config values from the
architecture reference). No timing: safe to run any time. Writes bench/results/cache_bytes.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import checkpoints
from common import RESULTS, meta, print_table, write_result

COLUMNS = [("model", "model", ""), ("layers", "layers", "d"), ("mla_values", "MLA/layer", "d"),
           ("index_values", "index/layer", "d"), ("ours_bytes_bf16", "ours B/tok bf16", ",d"),
           ("mha_bytes_bf16", "MHA B/tok bf16", ",d"), ("ratio", "ours/MHA", ".3f"), ("saving", "x smaller", ".1f"),
           ("checked", "allocated==", "")]

GLM5_REAL = dict(  # the real GLM-5's sizes, as its config.json gives them
    architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144,
    intermediate_size=12288, moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64,
    n_routed_experts=256, num_experts_per_tok=8, kv_lora_rank=512, q_lora_rank=2048, qk_nope_head_dim=192,
    qk_rope_head_dim=64, v_head_dim=256, first_k_dense_replace=3, index_topk=2048, index_head_dim=128,
    index_n_heads=32, num_nextn_predict_layers=1,
)


def row_for(name: str, cfg, check: bool = True) -> dict:
    import torch

    from model.kv_cache import KVCache

    layers = cfg.num_cache_layers
    mla = cfg.latent_dim
    idx_layers = sum(1 for i in range(layers) if cfg.use_indexer and (i >= cfg.num_hidden_layers
                                                                       or cfg.has_own_indexer(i)))
    ours_values = layers * mla + idx_layers * cfg.index_head_dim
    mha_values = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    row = {"model": name, "layers": layers, "mla_values": mla,
           "index_values": cfg.index_head_dim if cfg.use_indexer else 0,
           "ours_values": ours_values, "mha_values": mha_values,
           "ours_bytes_bf16": 2 * ours_values, "mha_bytes_bf16": 2 * mha_values,
           "ours_bytes_fp32": 4 * ours_values, "mha_bytes_fp32": 4 * mha_values,
           "ratio": ours_values / mha_values, "saving": mha_values / ours_values}
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == row["ours_bytes_bf16"]
    if check:  # what the engine really allocates, per token slot
        cache = KVCache(cfg, 2, 16, torch.bfloat16)
        allocated = sum(t.numel() * t.element_size() for t in [*cache.latent, *cache.index] if t is not None)
        row["checked"] = allocated // 32 == row["ours_bytes_bf16"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, nargs="*", default=[], help="extra checkpoint directories")
    ap.add_argument("--name", default="cache_bytes")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from model.config import ModelConfig

    configs: list[tuple[str, ModelConfig, bool]] = []
    shipped = checkpoints.default_model()
    if shipped is not None:
        configs.append((f"default ({shipped.name})", ModelConfig.from_dir(shipped), True))
    else:
        configs.append(("default config (model.train)", ModelConfig.from_dict(checkpoints.default_config_dict()),
                        True))
    base = checkpoints.default_config_dict()
    dsv3 = {k: base[k] for k in base if k not in ("index_topk", "index_head_dim", "index_n_heads")}
    dsv3.update(checkpoints.DSV3_VLLM, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                num_nextn_predict_layers=0)
    configs.append(("DeepSeek-V3 bench (vLLM peer)", ModelConfig.from_dict(dsv3), True))
    configs.append(("GLM-5 (real config)", ModelConfig.from_dict(GLM5_REAL), False))
    for path in args.model:
        configs.append((path.name, ModelConfig.from_dir(path), True))
    rows = [row_for(name, cfg, check) for name, cfg, check in configs]
    print_table("KV cache bytes per token (all layers incl. MTP): glm-serve's MLA latent + indexer key vs plain MHA "
                "K/V", COLUMNS, rows)
    print(f"wrote {write_result(args.name, rows, meta(), {}, args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
