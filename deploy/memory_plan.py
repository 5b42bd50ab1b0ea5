"""GPU memory plan for a GLM-5-class checkpoint under tensor + expert parallelism, from its config.json.

    python3 deploy/memory_plan.py                                   # GLM-5-FP8, TP 8 on 8 x H200
    python3 deploy/memory_plan.py --tp 16 --weights bf16            # GLM-5 (bf16) over two nodes
    python3 deploy/memory_plan.py --config DIR/config.json --json   # any checkpoint, machine-readable

Counts every tensor glm-serve holds, with the sharding of the tensor-parallel network: q_b/kv_b/o_proj split by
heads, dense and shared-expert MLPs split, routed experts E/N per rank, embedding and LM head split by vocabulary;
q_a/kv_a projections, norms, the router and the DSA indexer replicated (so is the cache). FP8 weights (the
projections a block-FP8 checkpoint quantizes) cost 1 byte plus an fp32 scale per 128x128 block of the rank's
slice; kv_b_proj is held in bf16 because absorbed MLA reads it as a matrix. Everything else is bf16, the router's
selection bias fp32. The cache per token is the MLA latent (kv_lora_rank + qk_rope_head_dim) plus the indexer key
(index_head_dim) per layer, MTP layers included, in bf16, on every rank. Pure Python: no torch needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
H200_MIB = 143_771  # what nvidia-smi reports for one H200 (its "141 GB")
# Not the weights' or the cache's: CUDA context, NCCL buffers, the activations of one 2048-token step, allocator
# slack. An assumption to check on the first GPU run (bench/gpu.sh prints the free memory after loading).
RESERVE_GIB = 10.0


def blocks(n: int) -> int:
    return -(-n // 128)


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str, str, int]]:
    """(name, shape, storage, split, count): storage fp8 | bf16 | fp32; split rep | row | col | ep | vocab
    (row = dim 0 split, col = dim 1 split); count = how many such tensors the model has."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, ql, kl = cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ih, idim = cfg.get("index_n_heads", 0), cfg.get("index_head_dim", 0)
    I, Im, E = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    ns = cfg.get("n_shared_experts", 1)
    L, mtp, dense = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0), cfg["first_k_dense_replace"]
    indexer = cfg.get("model_type", "glm_moe_dsa") == "glm_moe_dsa"
    layers, moe_layers = L + mtp, L + mtp - dense
    out = [
        ("embed_tokens", (V, H), "bf16", "vocab", 1), ("lm_head", (V, H), "bf16", "vocab", 1),
        ("norm", (H,), "bf16", "rep", 1),
        ("q_a_proj", (ql, H), "fp8", "rep", layers), ("q_a_layernorm", (ql,), "bf16", "rep", layers),
        ("q_b_proj", (nh * (dn + dr), ql), "fp8", "row", layers),
        ("kv_a_proj_with_mqa", (kl + dr, H), "fp8", "rep", layers), ("kv_a_layernorm", (kl,), "bf16", "rep", layers),
        ("kv_b_proj", (nh * (dn + dv), kl), "bf16", "row", layers),
        ("o_proj", (H, nh * dv), "fp8", "col", layers),
        ("input/post_attention_layernorm", (H,), "bf16", "rep", 2 * layers),
        ("dense gate/up_proj", (I, H), "fp8", "row", 2 * dense), ("dense down_proj", (H, I), "fp8", "col", dense),
        ("router gate", (E, H), "bf16", "rep", moe_layers),
        ("e_score_correction_bias", (E,), "fp32", "rep", moe_layers),
        ("experts gate/up_proj", (Im, H), "fp8", "ep", 2 * E * moe_layers),
        ("experts down_proj", (H, Im), "fp8", "ep", E * moe_layers),
        ("shared gate/up_proj", (Im * ns, H), "fp8", "row", 2 * moe_layers),
        ("shared down_proj", (H, Im * ns), "fp8", "col", moe_layers),
        ("mtp enorm/hnorm/shared_head.norm", (H,), "bf16", "rep", 3 * mtp),
        ("mtp eh_proj", (H, 2 * H), "fp8", "rep", mtp),
    ]
    if indexer:
        out += [("indexer wq_b", (ih * idim, ql), "fp8", "rep", layers),
                ("indexer wk", (idim, H), "fp8", "rep", layers),
                ("indexer k_norm weight/bias", (idim,), "bf16", "rep", 2 * layers),
                ("indexer weights_proj", (ih, H), "bf16", "rep", layers)]
    return out


def local_shape(shape: tuple[int, ...], split: str, tp: int) -> tuple[int, ...]:
    if split in ("row", "vocab"):
        return (math.ceil(shape[0] / tp), *shape[1:])
    if split == "col":
        return (shape[0], math.ceil(shape[1] / tp))
    return shape


def per_gpu(cfg: dict, tp: int, weights: str) -> list[dict]:
    """One row per tensor kind: how many of them one GPU holds, their local shape and bytes."""
    rows = []
    for name, shape, storage, split, count in tensors(cfg):
        held = count / tp if split == "ep" else count  # experts: E/N of them per rank, whole
        local = shape if split == "ep" else local_shape(shape, split, tp)
        m = math.prod(local)
        if storage == "fp8" and weights == "fp8":
            size = m + 4 * blocks(local[0]) * blocks(local[-1])
        else:
            storage = "fp32" if storage == "fp32" else "bf16"
            size = (4 if storage == "fp32" else 2) * m
        rows.append({"tensor": name, "shape": shape, "storage": storage, "split": split, "per_gpu": held,
                     "local_shape": local, "params": m * held, "bytes": size * held,
                     "model_params": math.prod(shape) * count})
    return rows


def plan(cfg: dict, tp: int, weights: str, gpu_mib: int, reserve_gib: float, block_size: int = 16) -> dict:
    """The per-GPU figures. weights: fp8 (a block-FP8 checkpoint) or bf16 (everything bf16)."""
    rows = per_gpu(cfg, tp, weights)
    total_params = sum(r["model_params"] for r in rows)
    rank_params = sum(r["params"] for r in rows)
    rank_bytes = sum(r["bytes"] for r in rows)
    mtp_params = total_params - sum(r["model_params"] for r in per_gpu({**cfg, "num_nextn_predict_layers": 0}, tp,
                                                                       weights))
    layers = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    index_key = cfg.get("index_head_dim", 0) if cfg.get("model_type", "glm_moe_dsa") == "glm_moe_dsa" else 0
    kv_bytes = 2 * (latent + index_key) * layers
    gpu_bytes = gpu_mib * (1 << 20)
    free = gpu_bytes - rank_bytes - reserve_gib * GIB
    tokens = max(0, int(free // kv_bytes) // block_size * block_size)
    return {
        "tp": tp, "weights": weights, "total_params_b": total_params / 1e9,
        "mtp_params_b": mtp_params / 1e9, "params_per_gpu_b": rank_params / 1e9,
        "weight_gib_per_gpu": rank_bytes / GIB, "gpu_gib": gpu_bytes / GIB, "reserve_gib": reserve_gib,
        "cache_gib_per_gpu": max(free, 0) / GIB, "cache_layers": layers, "latent_values": latent,
        "index_key_values": index_key, "kv_bytes_per_token": kv_bytes, "kv_cache_tokens": tokens,
        "max_model_len": cfg["max_position_embeddings"],
        "full_length_sequences": tokens / cfg["max_position_embeddings"],
        "fits": free > 0,
    }


def render_detail(rows: list[dict]) -> str:
    lines = [f"{'tensor':34} {'shape':>14} {'stored':>6} {'split':>5} {'per GPU':>8} {'local shape':>14} {'GiB':>8}"]
    for r in rows:
        lines.append(f"{r['tensor']:34} {'x'.join(map(str, r['shape'])):>14} {r['storage']:>6} {r['split']:>5} "
                     f"{r['per_gpu']:8g} {'x'.join(map(str, r['local_shape'])):>14} {r['bytes'] / GIB:8.3f}")
    return "\n".join(lines)


def render(p: dict) -> str:
    return "\n".join([
        f"TP {p['tp']}, {p['weights']} weights: {p['total_params_b']:.1f}B parameters in all (MTP layer "
        f"{p['mtp_params_b']:.2f}B), {p['params_per_gpu_b']:.1f}B per GPU",
        f"  weights per GPU      {p['weight_gib_per_gpu']:8.1f} GiB",
        f"  GPU memory           {p['gpu_gib']:8.1f} GiB, minus {p['reserve_gib']:.0f} GiB runtime reserve",
        f"  left for the cache   {p['cache_gib_per_gpu']:8.1f} GiB per GPU (replicated: every rank caches every token)",
        f"  cache per token      {p['kv_bytes_per_token']:8,d} B = 2 B x ({p['latent_values']} latent + "
        f"{p['index_key_values']} indexer key) x {p['cache_layers']} layers",
        f"  tokens that fit      {p['kv_cache_tokens']:8,d} (--kv-cache-tokens; "
        f"{p['full_length_sequences']:.2f} sequences of {p['max_model_len']:,d})" if p["fits"] else
        "  does not fit: the weights alone exceed the GPU",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "glm5-fp8" / "config.json")
    ap.add_argument("--tp", type=int, default=8, help="tensor-parallel size = GPUs per replica")
    ap.add_argument("--weights", choices=["fp8", "bf16"], default=None,
                    help="default: fp8 when the config has a quantization_config")
    ap.add_argument("--gpu-mib", type=int, default=H200_MIB, help="memory of one GPU (default: H200)")
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--detail", action="store_true", help="also list every tensor kind's bytes per GPU")
    args = ap.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    weights = args.weights or ("fp8" if cfg.get("quantization_config") else "bf16")
    p = plan(cfg, args.tp, weights, args.gpu_mib, args.reserve_gib)
    print(json.dumps(p, indent=2) if args.json else render(p))
    if args.detail:
        print(render_detail(per_gpu(cfg, args.tp, weights)))
    return 0 if p["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
