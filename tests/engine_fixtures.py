"""Tiny random GLM-MoE-DSA checkpoints for the engine tests, written by transformers (the oracle).

`initializer_range` 0.1 makes random logits peaked, so greedy choices are decisive; 16 indexer heads make an
exact zero-score tie in the DSA top-k (all heads' ReLU at zero) rare enough not to flip a comparison; a small
`index_topk` puts most prompts in the sparse regime. The MTP layer is added the way DESIGN.md §4 describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    first_k_dense_replace=1, index_topk=8, index_head_dim=16, index_n_heads=16, max_position_embeddings=256,
    initializer_range=0.1, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    bos_token_id=None, eos_token_id=[0], pad_token_id=0,
)
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ", "def forward(self, x):\n    return x + 1\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, émoji 🙂 and more. ", "hello world, hello engine, hello cache. ",
] * 20


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE trained on a few lines; multi-byte characters span several tokens (detokenizer tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[0], "pad_token": SPECIALS[0],
           "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [0], "pad_token_id": 0}))


def make_checkpoint(out: Path, *, seed: int = 0, mtp: bool = True, tokenizer: bool = True, **overrides) -> Path:
    """Write a transformers checkpoint of `TINY` (+ `overrides`) to `out`; with `mtp`, a random MTP layer too."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    params = {**TINY, **overrides}
    L = params["num_hidden_layers"]
    torch.manual_seed(seed)
    config = GlmMoeDsaConfig(**{**params, "num_hidden_layers": L + 1 if mtp else L})
    GlmMoeDsaForCausalLM(config).save_pretrained(out)
    if mtp:
        cfg = json.loads((out / "config.json").read_text())
        cfg["num_hidden_layers"] = L
        cfg["num_nextn_predict_layers"] = 1
        for key in ("mlp_layer_types", "layer_types", "indexer_types"):
            cfg.pop(key, None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        sd = load_file(out / "model.safetensors")
        H, g = params["hidden_size"], torch.Generator().manual_seed(seed + 1)
        for name in ("enorm", "hnorm", "shared_head.norm"):
            sd[f"model.layers.{L}.{name}.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[f"model.layers.{L}.eh_proj.weight"] = 0.1 * torch.randn(H, 2 * H, generator=g)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        build_tokenizer(out, params["vocab_size"])
    return out


def hf_model(path: Path):
    """The transformers oracle in fp32 eager (MTP weights, if any, are ignored by transformers)."""
    from transformers import GlmMoeDsaForCausalLM

    model = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, one request alone, eos off."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int, lengths: list[int], vocab: int = 320, seed: int = 0) -> list[list[int]]:
    """`n` random prompts cycling through `lengths` (token 0, the eos, is avoided)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]
