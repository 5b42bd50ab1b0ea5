"""Tensor + expert parallelism (model/parallel.py) on CPU with gloo: world sizes 2 and 4 give the logits of world
size 1 within 1e-5 (fp32) and the same tokens, for GLM-5 (DSA past index_topk, group-limited routing, the MTP
layer) and for DeepSeek-V3 (no indexer, no q LoRA), through the model alone and
through the engine's step code (batching, n > 1, MTP drafts with K = 2). Every rank must agree with every other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model import parallel
from model.config import ModelConfig
from tests import engine_fixtures, model_fixtures
from tests.tp_fixtures import STEPS, run_ranks, run_tp_engine, workload

ATOL = 1e-5

# Group-limited routing (4 groups of 2 experts, 2 groups kept), 2 experts per rank at world size 4.
GLM = dict(vocab_size=320, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def glm_ckpt(tmp_path_factory) -> Path:
    return engine_fixtures.make_checkpoint(tmp_path_factory.mktemp("tp_glm"), tokenizer=False, seed=5, **GLM)


@pytest.fixture(scope="module")
def dsv3_ckpt(tmp_path_factory) -> Path:
    """DeepSeek-V3 without q LoRA (q_proj split by heads), group-limited routing, an MTP layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("tp_dsv3")
    L = 2
    torch.manual_seed(6)
    cfg = DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=L + 1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=1, n_group=4, topk_group=2, initializer_range=0.1, max_position_embeddings=512,
        eos_token_id=1, bos_token_id=0)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.2)
    model.save_pretrained(path)
    model_fixtures._declare_mtp(path, 32, L, seed=6)
    return path


@pytest.fixture(scope="module")
def glm_fp8_ckpt(glm_ckpt, tmp_path_factory) -> Path:
    """The GLM checkpoint block-quantized by `python -m model.quantize` (each rank reads its slice of the FP8
    weights and of their scale blocks, and dequantizes at load on CPU)."""
    from model.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("tp_glm_fp8")
    assert quantize_checkpoint(glm_ckpt, out) > 0
    return out


def _world1(ckpt: Path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return workload(ckpt)
    finally:
        torch.set_num_threads(before)


def _same(a, b, path: str = "") -> None:
    """Equal structures: tensors and floats within ATOL, everything else exactly."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, path
        diff = (a - b).abs().max().item()
        assert diff <= ATOL, f"{path}: max |diff| {diff:.2e}"
    elif isinstance(a, float):
        assert abs(a - b) <= ATOL, f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} items ({a} vs {b})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} vs {b}"


@pytest.fixture(scope="module")
def world1(request):
    """The world size 1 outputs, per checkpoint."""
    return {which: _world1(request.getfixturevalue(f"{which}_ckpt")) for which in ("glm", "dsv3")}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("which", ["glm", "dsv3"])
def test_tensor_parallel_matches_one_rank(request, tmp_path, world1, which, world):
    ref = world1[which]
    ranks = run_ranks(request.getfixturevalue(f"{which}_ckpt"), world, tmp_path)
    for r, got in enumerate(ranks):
        _same(got, ref, f"rank {r}/{world}")
    assert len(ref["model"]["tokens"]) == STEPS and "mtp_logits" in ref["model"]
    engine = ref["engine"]
    assert engine["drafts"] > 0  # the MTP layer drafted (K = 2) and the main model verified
    toks = engine["tokens"]
    assert len(toks) == 6 and all(len(t) == STEPS for ch in toks.values() for t in ch.values())
    assert len(toks["n2"]) == len(toks["s2"]) == 2


def test_engine_tensor_parallel_size_2(tmp_path, glm_ckpt, world1):
    """The engine at tensor_parallel_size 2: rank 0 schedules, samples and broadcasts each model call as the
    step's plan; its spawned worker runs the same calls. Same tokens and logprobs as one rank."""
    _same(run_tp_engine(glm_ckpt, 2, tmp_path), world1["glm"]["engine"], "engine tp 2")


def test_shard_spec_covers_every_tensor(glm_ckpt):
    """Per checkpoint name: heads, MLP columns and the vocabulary split by rows, o_proj and down by columns,
    experts owned whole by one rank each, everything else replicated; slices tile each tensor exactly."""
    cfg = ModelConfig.from_dir(glm_ckpt)
    world = 4
    with safe_open(str(glm_ckpt / "model.safetensors"), "pt") as st:
        for name in st.keys():  # noqa: SIM118
            shape = st.get_slice(name).get_shape()
            specs = {parallel.shard_spec(name, cfg, r, world) for r in range(world)}
            assert len(specs) == 1, name
            dim = specs.pop()
            owners = [r for r in range(world) if parallel.owns(name, cfg, r, world)]
            if ".mlp.experts." in name:
                assert dim is None and len(owners) == 1, name
                assert owners[0] == int(name.split(".mlp.experts.")[1].split(".")[0]) // 2
                continue
            assert owners == list(range(world)), name
            split = {"q_b_proj": 0, "kv_b_proj": 0, "gate_proj": 0, "up_proj": 0, "embed_tokens": 0,
                     "lm_head": 0, "o_proj": 1, "down_proj": 1}
            expected = next((d for k, d in split.items() if f"{k}." in name and name.endswith("weight")), None)
            if "indexer" in name:
                expected = None
            assert dim == expected, name
            if dim is not None:
                parts = [parallel.read_shard(st, name, dim, r, world) for r in range(world)]
                assert torch.equal(torch.cat(parts, dim), st.get_tensor(name)), name
                assert sum(p.shape[dim] for p in parts) == shape[dim]


def test_shard_spec_of_network_parameters(glm_ckpt):
    """The same function answers for the network's parameter names (what a loader given a per-parameter plan
    asks): stacked experts split on dim 0 (expert parallel), everything else as its checkpoint name."""
    cfg = ModelConfig.from_dir(glm_ckpt)
    parallel.set_group(parallel.TPGroup(rank=1, world=2))
    try:
        from model.network import GlmMoeDsaForCausalLM

        with torch.device("meta"):
            sharded = GlmMoeDsaForCausalLM(cfg).state_dict()
    finally:
        parallel.set_group(parallel.TPGroup())
    with torch.device("meta"):
        whole = GlmMoeDsaForCausalLM(cfg).state_dict()
    for name, t in whole.items():
        dim = parallel.shard_spec(name, cfg, 1, 2)
        want = list(t.shape)
        if dim is not None:
            want[dim] //= 2
        assert list(sharded[name].shape) == want, name
    assert parallel.shard_spec("model.layers.1.mlp.experts.gate_up_proj", cfg, 0, 2) == 0
    assert parallel.shard_spec("model.layers.1.mlp.experts.gate_up_proj_scale_inv", cfg, 0, 2) == 0


def test_uneven_split_refused_for_heads(glm_ckpt):
    """Heads (and experts, MLP columns) must split evenly; a world of 3 over 4 heads is a clear error."""
    parallel.set_group(parallel.TPGroup(rank=0, world=3))
    try:
        with pytest.raises(ValueError, match="does not split evenly over 3"):
            from model.network import GlmMoeDsaForCausalLM

            with torch.device("meta"):
                GlmMoeDsaForCausalLM(ModelConfig.from_dir(glm_ckpt))
    finally:
        parallel.set_group(parallel.TPGroup())


def test_config_routing_is_group_limited(glm_ckpt, dsv3_ckpt):
    for ckpt in (glm_ckpt, dsv3_ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        assert 1 < cfg["topk_group"] < cfg["n_group"] and cfg["num_nextn_predict_layers"] == 1


def test_tensor_parallel_size_must_divide_the_model(glm_ckpt):
    """Checked before any rank starts: 3 ranks cannot split 4 heads or 8 experts."""
    with pytest.raises(ValueError, match=r"must divide num_attention_heads \(4\), n_routed_experts \(8\)"):
        engine_fixtures.make_engine(glm_ckpt, tensor_parallel_size=3)


def test_tp_flag_reaches_the_engine_config(glm_ckpt):
    from service.settings import SettingsError, parse_settings

    for argv in (["-tp", "2"], ["--tensor-parallel-size", "2"]):
        assert parse_settings(argv).engine_config(glm_ckpt).tensor_parallel_size == 2
    assert parse_settings([]).engine_config(glm_ckpt).tensor_parallel_size == 1
    with pytest.raises(SettingsError, match="--tensor-parallel-size"):
        parse_settings(["-tp", "0"])
    with pytest.raises(SettingsError, match=r"multiple of --nnodes \(2\)"):
        parse_settings(["-tp", "3", "--nnodes", "2"])
    with pytest.raises(SettingsError, match=r"--node-rank \(2\) must be below --nnodes \(2\)"):
        parse_settings(["-tp", "4", "--nnodes", "2", "--node-rank", "2"])
    cfg = parse_settings(["-tp", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                          "--master-port", "29500"]).engine_config(glm_ckpt)
    assert (cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == (2, 1, "10.0.0.1", 29500)


def test_fp8_checkpoint_at_tensor_parallel_2_matches_one_rank(tmp_path, glm_fp8_ckpt):
    """A model.quantize checkpoint serves at TP 2 exactly as at TP 1 (model and engine workloads)."""
    ref = _world1(glm_fp8_ckpt)
    for r, got in enumerate(run_ranks(glm_fp8_ckpt, 2, tmp_path)):
        _same(got, ref, f"rank {r}/2")
    assert ref["engine"]["drafts"] > 0
