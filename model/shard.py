"""Which slice of each parameter a tensor-parallel rank holds: the contract between the sharded network and the
loader.

The network names, per parameter (its name in our module tree, e.g. ``model.layers.3.self_attn.q_b_proj.weight``),
the dimension it splits and this rank's place; parameters without a spec are replicated. The loader then reads only
that slice from the memory-mapped checkpoint. The stacked routed experts (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]) split on dim 0 is expert parallelism: the rank owns experts
[rank * E/N, (rank + 1) * E/N) and never reads the others. A split of dim 1 or 2 of a stacked expert tensor slices
each expert's own tensor (gate and up each split, so a rank's gate|up stays fused).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShardSpec:
    """Rank `rank` of `world_size` holds the rank-th of `world_size` equal chunks of dimension `dim`."""

    dim: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.dim < 0:
            raise ValueError(f"invalid shard {self}")

    def bounds(self, size: int) -> tuple[int, int]:
        """[start, stop) of this rank's chunk of a dimension of `size`; the size must divide evenly."""
        if size % self.world_size:
            raise ValueError(f"dimension {self.dim} of size {size} does not split into {self.world_size} equal "
                             "shards")
        chunk = size // self.world_size
        return self.rank * chunk, (self.rank + 1) * chunk


# A mapping from parameter name, or a function of it; None (or absent) = replicated.
ShardPlan = Mapping[str, ShardSpec] | Callable[[str], ShardSpec | None]


def spec_for(plan: ShardPlan | None, name: str) -> ShardSpec | None:
    if plan is None:
        return None
    if isinstance(plan, Mapping):
        return plan.get(name)
    return plan(name)


def tensor_slices(shape: tuple[int, ...], spec: ShardSpec | None) -> tuple[slice, ...]:
    """The index that selects a rank's chunk of a tensor of `shape` (everything when `spec` is None)."""
    index = [slice(0, n) for n in shape]
    if spec is not None:
        if spec.dim >= len(shape):
            raise ValueError(f"shard dim {spec.dim} of a {len(shape)}-d tensor")
        index[spec.dim] = slice(*spec.bounds(shape[spec.dim]))
    return tuple(index)


def shrink_to_shards(model: Any, plan: Mapping[str, ShardSpec]) -> Any:
    """Give each planned parameter of a network built whole on the meta device its per-rank shape, so the loader
    can fill it. For tests and benchmarks of loading; the tensor-parallel network builds its layers at their local
    sizes itself."""
    import torch

    for name, spec in plan.items():
        owner_name, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        p = getattr(owner, attr)
        if p.device.type != "meta":
            raise ValueError(f"{name}: shrink_to_shards works on a meta network")
        shape = list(p.shape)
        start, stop = spec.bounds(shape[spec.dim])
        shape[spec.dim] = stop - start
        setattr(owner, attr, torch.nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"),
                                                requires_grad=p.requires_grad))
    return model
