"""Checkpoints the benchmarks run on, all written by transformers (so every peer loads the same bytes).

- `default_model()`: the shipped model (model/weights/<name>/), when it has been trained.
- `glm_checkpoint()`: a random GlmMoeDsa checkpoint with the default model's config (`model.train.default_config`)
  plus overrides (a raised `max_position_embeddings` for DSA at long contexts, a small size for tests).
- `deepseek_v3_checkpoint()`: the vLLM comparison checkpoint, `DeepseekV3ForCausalLM` (MLA + MoE, no indexer),
  sized like the default model except where vLLM's CPU MLA insists: kv_lora_rank 512 + qk_rope_head_dim 64 = 576
  and `topk_method: noaux_tc` in config.json. Our tokenizer files are copied in so both servers tokenize alike.

    python bench/checkpoints.py deepseek-v3 --out bench/results/ckpt-dsv3      # write one for manual use
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from common import ROOT

WEIGHTS = ROOT / "model" / "weights"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_model() -> Path | None:
    """The shipped checkpoint, once its weights exist."""
    found = sorted(p.parent for p in WEIGHTS.glob("*/model.safetensors")) if WEIGHTS.is_dir() else []
    return found[0] if found else None


def model_or_shipped(model: Path | None) -> Path:
    """`--model` if given, else the shipped checkpoint; exits with a hint when neither exists."""
    model = model or default_model()
    if model is None:
        raise SystemExit("no shipped model yet (model/weights/*/model.safetensors); pass --model DIR")
    return model


def tokenizer_source() -> Path | None:
    """Where our tokenizer lives: the shipped model, else the trainer's tokenizer directory."""
    for d in (default_model(), ROOT / "runs" / "tokenizer"):
        if d is not None and (d / "tokenizer.json").is_file():
            return d
    return None


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _special_ids(tok_dir: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids of our tokenizer (the default config uses [gMASK] as bos), or neutral ones."""
    if tok_dir is None:
        return {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    gen = json.loads((tok_dir / "generation_config.json").read_text()) if (
        tok_dir / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", tok.token_to_id("<|endoftext|>") or 0)
    return {"bos_token_id": tok.token_to_id("[gMASK]"), "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", tok.token_to_id("<|endoftext|>"))}


def default_config_dict(vocab_size: int = 8192, tok_dir: Path | None = None) -> dict[str, Any]:
    from model.train import default_config

    ids = _special_ids(tok_dir)
    eos = ids["eos_token_id"]
    return default_config(vocab_size, ids["bos_token_id"], eos if isinstance(eos, list) else [eos],
                          ids["pad_token_id"])


def _vocab_size(tok_dir: Path | None, fallback: int) -> int:
    if tok_dir is None:
        return fallback
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def glm_checkpoint(out: Path, *, tokenizer: Path | None | bool = True, seed: int = 0, **overrides: Any) -> Path:
    """A random GlmMoeDsa checkpoint: the default model's config updated by `overrides`, no MTP layer."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    tok = tokenizer_source() if tokenizer is True else (tokenizer or None)
    vocab = max(_vocab_size(tok, 8192), overrides.get("vocab_size", 0))
    cfg = {**default_config_dict(vocab, tok), **overrides, "vocab_size": vocab, "num_nextn_predict_layers": 0}
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**cfg)).save_pretrained(out)
    _patch_config(out, {k: cfg[k] for k in ("index_topk", "max_position_embeddings", "num_nextn_predict_layers")})
    if tok is not None:
        copy_tokenizer(tok, out)
    return out


DSV3_VLLM = dict(kv_lora_rank=512, qk_rope_head_dim=64)  # what vLLM's CPU MLA needs (576 = 512 + 64)


def deepseek_v3_checkpoint(out: Path, *, tokenizer: Path | None | bool = True, seed: int = 0,
                           **overrides: Any) -> Path:
    """DeepseekV3ForCausalLM sized like the default model, with vLLM CPU's MLA sizes, written by transformers."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tok = tokenizer_source() if tokenizer is True else (tokenizer or None)
    base = default_config_dict(_vocab_size(tok, 8192), tok)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
            "norm_topk_prob", "q_lora_rank", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings",
            "rms_norm_eps", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
    cfg = {k: base[k] for k in keep if k in base}
    cfg.update(DSV3_VLLM)
    cfg.update(overrides)
    if isinstance(cfg.get("eos_token_id"), list) and len(cfg["eos_token_id"]) == 1:
        cfg["eos_token_id"] = cfg["eos_token_id"][0]
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
    with torch.no_grad():  # a non-zero expert selection bias, so both servers must apply it the same way
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.02)
    model.save_pretrained(out)
    _patch_config(out, {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0})
    if tok is not None:
        copy_tokenizer(tok, out)
    return out


def _patch_config(out: Path, fields: dict[str, Any]) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def dense_twin(ckpt: Path, out: Path, index_topk: int) -> Path:
    """The same weights with a different `index_topk` (>= the context: dense attention): config copied and
    patched, tensors symlinked."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    shutil.copy2(ckpt / "config.json", out / "config.json")
    _patch_config(out, {"index_topk": index_topk})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="write a benchmark checkpoint")
    ap.add_argument("kind", choices=["deepseek-v3", "glm"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-position-embeddings", type=int)
    args = ap.parse_args()
    extra = {"max_position_embeddings": args.max_position_embeddings} if args.max_position_embeddings else {}
    fn = deepseek_v3_checkpoint if args.kind == "deepseek-v3" else glm_checkpoint
    print(fn(args.out, **extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
