"""Block-FP8 checkpoints: the format math, `model.quantize`, loading (dequantized at load and kept FP8), a wrong
`modules_to_not_convert`, `--quantization fp8`, and the transformers oracle on the dequantized weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import fp8
from model.batch import ForwardBatch
from model.loader import CheckpointError, hf_state_dict, load_model
from model.quantize import main as quantize_main
from tests.model_fixtures import hf_model, make_checkpoint

# Widths past one 128 block with ragged edges: hidden 160 = 128 + 32; an expert's gate and up are 136 rows each, so
# the fused gate|up does not end its halves on a block (its scale rows are per half).
WIDE = dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=136, q_lora_rank=144, kv_lora_rank=144)


def reference_dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Block by block, written apart from model.fp8: each 128x128 block of q times its scale, in fp32."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def stored(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "src", seed=11, **WIDE)


@pytest.fixture(scope="module")
def quantized(bf16, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8") / "q"
    assert quantize_main([str(bf16), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def dequantized(quantized, tmp_path_factory):
    """The FP8 checkpoint with every quantized weight replaced by its reference dequantization (fp32), no scales."""
    dst = tmp_path_factory.mktemp("fp8") / "deq"
    dst.mkdir()
    tensors = stored(quantized)
    out = {n: reference_dequantize(t, tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
           for n, t in tensors.items() if not n.endswith("_scale_inv")}
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(ids, ForwardBatch.single(len(ids))))


def test_blockwise_roundtrip_edges_and_offsets():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 3
    w[128:256, 128:] = 0  # an all-zero block must not divide by zero
    q, s = fp8.quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200) and s.shape == (3, 2) and s.dtype == torch.float32
    full = fp8.dequantize_blockwise(q, s)
    assert torch.equal(full, reference_dequantize(q, s))
    assert ((full - w).abs() <= w.abs() / 16 + s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
            * 2 ** -9).all()  # e4m3: 3 mantissa bits; subnormals step by 2^-9 of the block scale
    assert full[128:256, 128:].eq(0).all()
    # A shard starting inside a block reads the scale blocks that cover it and places itself by the offset.
    rows, cols = slice(64, 250), slice(10, 150)
    part = fp8.dequantize_blockwise(q[rows, cols], s[fp8.block_range(64, 250), fp8.block_range(10, 150)],
                                    offset=(64, 10))
    assert torch.equal(part, full[rows, cols])


def test_quantize_writes_the_published_layout(bf16, quantized):
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                             "activation_scheme": "dynamic"}
    tensors = stored(quantized)
    q = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]  # [144 + 8, 160]: padded edge blocks
    assert q.dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    for kept in ("model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.indexer.weights_proj.weight",
                 "lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert tensors[kept].dtype == torch.float32 and kept + "_scale_inv" not in tensors
    assert (quantized / "generation_config.json").exists()


def test_fp8_checkpoint_equals_reference_dequantization_and_transformers(quantized, dequantized):
    model = load_model(quantized)  # CPU: dequantized to fp32 at load
    want = stored(dequantized)
    got = hf_state_dict(model)
    assert got.keys() == want.keys()
    mismatched = [n for n in want if not torch.equal(got[n], want[n])]
    assert not mismatched
    ids = torch.arange(2, 40)
    with torch.no_grad():
        ref = hf_model(dequantized)(ids[None]).logits[0]
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-4


def test_kept_fp8_runs_the_same_through_runtime_dequantization(quantized):
    """The CUDA layout (weights stay float8, scales beside them) run on CPU through the same `layers.linear`."""
    kept = load_model(quantized, fp8_weights="keep")
    attn = kept.model.layers[1].self_attn
    experts = kept.model.layers[1].mlp.experts
    assert attn.q_b_proj.weight.dtype == torch.float8_e4m3fn and attn.q_b_proj.weight.scale_inv.shape == (1, 2)
    assert attn.kv_b_proj.weight.dtype == torch.float32  # read as a matrix by absorbed MLA: dequantized at load
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.gate_up_proj.segments == (136, 136)
    assert experts.gate_up_proj_scale_inv.shape == (8, 4, 2)
    ids = torch.arange(2, 40)
    assert torch.allclose(logits(kept, ids), logits(load_model(quantized), ids), rtol=0, atol=1e-5)


def test_wrong_modules_to_not_convert_is_ignored(quantized, tmp_path):
    path = tmp_path / "lying"
    shutil.copytree(quantized, path)
    config = json.loads((path / "config.json").read_text())
    # GLM-5-FP8's entry names no module; a second one names a module that *is* quantized.
    config["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.self_attn.indexers_proj",
                                                               "q_b_proj", "mlp.experts"]
    (path / "config.json").write_text(json.dumps(config))
    a, b = hf_state_dict(load_model(path)), hf_state_dict(load_model(quantized))
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_quantization_flag_at_load_equals_model_quantize(bf16, quantized):
    at_load = hf_state_dict(load_model(bf16, quantization="fp8"))
    offline = hf_state_dict(load_model(quantized))
    assert all(torch.equal(at_load[n], offline[n]) for n in offline)
    kept = load_model(bf16, quantization="fp8", fp8_weights="keep")
    assert kept.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.arange(5, 30)
    assert torch.allclose(logits(kept, ids), logits(load_model(quantized), ids), rtol=0, atol=1e-5)


def test_format_errors(quantized, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(quantized, path)
    tensors = stored(path)
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    tensors["model.layers.0.self_attn.q_a_proj.bogus_scale_inv"] = torch.ones(1, 1)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "float8 without its _scale_inv: model.layers.0.self_attn.o_proj.weight" in str(e.value)
    assert "unexpected: model.layers.0.self_attn.q_a_proj.bogus_scale_inv" in str(e.value)
    config = json.loads((quantized / "config.json").read_text())
    for key, value, words in (("fmt", "e5m2", "fmt"), ("weight_block_size", [64, 64], "weight_block_size"),
                              ("quant_method", "awq", "quant_method")):
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": {
            **config["quantization_config"], key: value}}))
        with pytest.raises(ValueError, match=words):
            load_model(path)
    with pytest.raises(ValueError, match="quantization"):
        load_model(quantized, quantization="int4")


def test_scales_are_read_from_the_file_the_index_names(quantized, tmp_path):
    """A sharded FP8 checkpoint may store a weight and its scale in different files."""
    path = tmp_path / "split"
    path.mkdir()
    tensors = stored(quantized)
    scales = {n: t for n, t in tensors.items() if n.endswith("_scale_inv")}
    rest = {n: t for n, t in tensors.items() if n not in scales}
    save_file(rest, str(path / "model-00001-of-00002.safetensors"))
    save_file(scales, str(path / "model-00002-of-00002.safetensors"))
    index = {n: "model-00001-of-00002.safetensors" for n in rest}
    index.update({n: "model-00002-of-00002.safetensors" for n in scales})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    shutil.copy(quantized / "config.json", path / "config.json")
    a, b = hf_state_dict(load_model(path)), hf_state_dict(load_model(quantized))
    assert all(torch.equal(a[n], b[n]) for n in b)
    with safe_open(path / "model-00002-of-00002.safetensors", "pt") as st:
        assert len(list(st.keys())) == len(scales)


def test_fp8_linear_declines_off_cuda():
    q, s = fp8.quantize_blockwise(torch.randn(256, 512))
    fp8.attach_scale(q, s)
    assert fp8.fp8_linear(torch.randn(3, 512), q) is None  # CPU: the caller dequantizes


def test_activation_quantization_is_per_token_per_128_channels():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    x[2, 128:] *= 1000  # one token's second group is far larger: its scale must not touch the others
    q, scale = fp8._quantize_activation(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 2)
    back = q.float().view(5, 2, 128) * scale[..., None]
    assert torch.allclose(back.view(5, 256), x, rtol=2 ** -4, atol=1e-4)  # e4m3: 3 mantissa bits
    assert torch.equal(scale[:, 0], x[:, :128].abs().amax(-1) / 448)
