"""Per-rank loading: each rank reads only its slice of each tensor (float and block-FP8 checkpoints), experts by
expert parallelism; where FP8 stays FP8 a shard that breaks a 128 block is a clear error."""

from __future__ import annotations

import pytest
import torch

from model import fp8
from model.loader import CheckpointError, load_model
from model.network import GlmMoeDsaForCausalLM
from model.quantize import quantize_checkpoint
from model.shard import ShardSpec, shrink_to_shards, tensor_slices
from tests.model_fixtures import make_checkpoint

WIDE = dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=136, q_lora_rank=144, kv_lora_rank=144)
L = 3  # TINY's decoder layers; layer 3 is the MTP layer


def tp_plan(rank: int, world: int, experts_dim: int = 0) -> dict[str, ShardSpec]:
    """The issue's TP = EP layout on a few layers: heads split, o_proj/down row-parallel, experts per rank,
    vocab-parallel embedding and head."""
    s = {d: ShardSpec(d, rank, world) for d in (0, 1, 2)}
    plan = {"model.embed_tokens.weight": s[0], "lm_head.weight": s[0]}
    for i in (0, 1, L):
        a = f"model.layers.{i}.self_attn."
        plan |= {a + "q_b_proj.weight": s[0], a + "kv_b_proj.weight": s[0], a + "o_proj.weight": s[1]}
    plan |= {"model.layers.0.mlp.gate_proj.weight": s[0], "model.layers.0.mlp.up_proj.weight": s[0],
             "model.layers.0.mlp.down_proj.weight": s[1]}
    for i in (1, L):
        m = f"model.layers.{i}.mlp."
        plan |= {m + "experts.gate_up_proj": s[experts_dim], m + "experts.down_proj": s[experts_dim],
                 m + "shared_experts.down_proj.weight": s[1]}
    return plan


def build_for(plan):
    return lambda cfg: shrink_to_shards(GlmMoeDsaForCausalLM(cfg), plan)


def expected_slice(full: torch.Tensor, name: str, spec: ShardSpec | None) -> torch.Tensor:
    if spec is None:
        return full
    if name.endswith("experts.gate_up_proj") and spec.dim == 1:  # gate and up are each split, then fused again
        gate, up = full.chunk(2, dim=1)
        return torch.cat([gate[:, slice(*spec.bounds(gate.shape[1]))], up[:, slice(*spec.bounds(up.shape[1]))]], 1)
    return full[tensor_slices(tuple(full.shape), spec)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    src = make_checkpoint(root / "src", seed=12, **WIDE)
    quantize_checkpoint(src, root / "q")
    return {"float": src, "fp8": root / "q"}


@pytest.mark.parametrize("kind", ["float", "fp8"])
@pytest.mark.parametrize("world,experts_dim", [(2, 0), (4, 0), (2, 1)])
def test_each_rank_holds_its_slice(ckpts, kind, world, experts_dim):
    """FP8 weights dequantized at load: a slice starting inside a block still equals the slice of the whole."""
    full = load_model(ckpts[kind]).state_dict()
    seen = {}
    for rank in range(world):
        plan = tp_plan(rank, world, experts_dim)
        part = load_model(ckpts[kind], shards=plan, build=build_for(plan)).state_dict()
        assert part.keys() == full.keys()
        for name, t in part.items():
            assert torch.equal(t, expected_slice(full[name], name, plan.get(name))), name
        seen[rank] = part["model.layers.1.mlp.experts.gate_up_proj"]
    stacked = torch.cat([seen[r] for r in range(world)], dim=experts_dim)
    if experts_dim == 0:  # the ranks' experts together are all experts, each exactly once
        assert torch.equal(stacked, full["model.layers.1.mlp.experts.gate_up_proj"])


def test_kept_fp8_expert_parallel_carries_its_scale_blocks(ckpts):
    whole = load_model(ckpts["fp8"], fp8_weights="keep").state_dict()
    plan = {n: s for n, s in tp_plan(1, 2).items() if ".experts." in n}
    part = load_model(ckpts["fp8"], fp8_weights="keep", shards=plan, build=build_for(plan)).state_dict()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert part[name].dtype == fp8.FP8
        assert torch.equal(part[name].view(torch.uint8), whole[name][4:].view(torch.uint8))
        assert torch.equal(part[name + "_scale_inv"], whole[name + "_scale_inv"][4:])


def test_kept_fp8_shard_breaking_a_block_is_an_error(ckpts):
    plan = tp_plan(1, 2)  # o_proj's 48 input columns split at 24: inside the first 128 block
    with pytest.raises(CheckpointError, match=r"o_proj.weight rows/cols \[24, 48\) of dim 1 break its 128x128"):
        load_model(ckpts["fp8"], fp8_weights="keep", shards=plan, build=build_for(plan))


def test_plan_errors(ckpts):
    with pytest.raises(ValueError, match="does not split into 5"):
        plan = {"lm_head.weight": ShardSpec(0, 0, 5)}
        load_model(ckpts["float"], shards=plan, build=build_for(plan))
    with pytest.raises(ValueError):
        ShardSpec(0, 2, 2)
    plan = {"model.layers.1.mlp.experts.gate_up_proj": ShardSpec(0, 0, 2)}  # the network was not shrunk
    with pytest.raises(CheckpointError, match="8 experts in the network, shard spec gives 4"):
        load_model(ckpts["float"], shards=plan)
