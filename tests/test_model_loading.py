"""Config and checkpoint errors are one clear exception naming the file and what is wrong; round trips work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.batch import ForwardBatch
from model.config import ConfigError, ModelConfig
from model.loader import CheckpointError, load_model, save_checkpoint
from tests.model_fixtures import hf_model, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load"), seed=6)


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_reads_every_field(ckpt):
    cfg = ModelConfig.from_dir(ckpt)
    assert cfg.model_type == "glm_moe_dsa" and cfg.use_indexer
    assert cfg.rope_theta == 1e6 and cfg.rope_interleave and cfg.indexer_rope_interleave
    assert cfg.num_nextn_predict_layers == 1 and cfg.num_cache_layers == cfg.num_hidden_layers + 1
    assert cfg.scoring_func == "sigmoid" and cfg.index_topk == 8
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda c: c.update(hidden_size="32"), "hidden_size"),
    (lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"), "architectures"),
    (lambda c: c.update(scoring_func="relu"), "scoring_func"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4, "rope_theta": 1e4}), "rope_scaling"),
    (lambda c: c.update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda c: c.update(indexer_types=["shared"] * 3), "indexer_types"),
])
def test_config_errors_name_file_and_field(ckpt, tmp_path, edit, field):
    path = copy_ckpt(ckpt, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field) as e:
        ModelConfig.from_dir(path)
    assert "config.json" in str(e.value)


def test_bad_json_and_missing_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path / "nowhere")


def test_missing_unexpected_and_misshaped_tensors_listed_together(ckpt, tmp_path):
    path = copy_ckpt(ckpt, tmp_path / "t")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(5, 5)
    tensors["model.layers.9.bogus.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "missing: model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "unexpected: model.layers.9.bogus.weight" in msg
    assert "shape: model.layers.0.self_attn.o_proj.weight is (5, 5)" in msg


def test_no_weights(tmp_path, ckpt):
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_save_roundtrip_loads_in_transformers_and_here(ckpt, tmp_path):
    model = load_model(ckpt)
    save_checkpoint(model, tmp_path / "out")
    again = load_model(tmp_path / "out")
    ids = torch.arange(2, 30)
    with torch.inference_mode():
        a = model.logits(model(ids, ForwardBatch.single(len(ids))))
        b = again.logits(again(ids, ForwardBatch.single(len(ids))))
    assert torch.equal(a, b)
    assert again.has_mtp
    original = load_file(str(ckpt / "model.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)


def test_tied_embeddings_match_transformers_and_roundtrip(tmp_path):
    """tie_word_embeddings: one matrix is both the embedding and the LM head; transformers saves it once (no
    lm_head.weight), we load it so, save it so, and a stray lm_head copy in a checkpoint is ignored."""
    path = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True, seed=5)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    ours = load_model(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(2, 96, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(path)(ids[None]).logits[0]
        got = ours.logits(ours(ids, ForwardBatch.single(len(ids))))
    assert (got - ref).abs().max().item() <= 1e-4
    save_checkpoint(ours, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in written
    written["lm_head.weight"] = torch.zeros_like(written["model.embed_tokens.weight"])  # ignored when tied
    save_file(written, str(tmp_path / "out" / "model.safetensors"))
    again = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again.logits(again(ids, ForwardBatch.single(len(ids)))), got)
