"""Tensor + expert parallelism over torch.distributed (TP = EP = world size, DP = 1), as vLLM and SGLang shard
DeepSeek-V3: attention split by heads, each rank owning E/N routed experts, dense MLPs and the shared expert split
by columns/rows, the vocabulary split for the embedding and the LM head; everything else replicated.

The process-wide group is set once per process by `init` before the model is built; the model reads it at
construction, so a model built without it (world size 1) has today's shapes and runs no collective at all.
`shard_spec` / `owns` say, per checkpoint tensor name, which slice a rank keeps: the loader reads just that slice.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# A collective that waits this long for a peer (a rank died or hangs) raises instead of blocking forever.
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TPGroup:
    """The tensor-parallel group: this process's rank and the world size (`group` None at world size 1), and a
    gloo group over the same ranks for control messages (the step plan) whatever the device."""

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None


_tp = TPGroup()


def tp() -> TPGroup:
    return _tp


def init(rank: int, world: int, init_method: str | None = None, backend: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the world (every rank calls it once, before building the model). Gloo on CPU, NCCL on CUDA unless
    `backend` says otherwise; `init_method` defaults to the env:// rendezvous (MASTER_ADDR, MASTER_PORT)."""
    global _tp
    if world == 1:
        _tp = TPGroup()
        return _tp
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":  # one GPU per rank of this node
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=timeout)
    cpu = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _tp = TPGroup(rank, world, dist.group.WORLD, cpu)
    return _tp


def set_group(group: TPGroup) -> None:
    """Use an existing group (a process whose torch.distributed world is already set up)."""
    global _tp
    _tp = group


def shutdown() -> None:
    global _tp
    if dist.is_initialized():
        dist.destroy_process_group()
    _tp = TPGroup()


# -- collectives: no-ops at world size 1 -------------------------------------------------------------------------
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (every rank gets the same bytes)."""
    if _tp.world > 1:
        dist.all_reduce(x, group=_tp.group)
    return x


def gather_last(x: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's [..., chunk] along the last dim (rank order), trimmed to `total` columns: the
    shards of `shard_range(total, r, world)`, the last of which may be shorter (padded here to gather)."""
    if _tp.world == 1:
        return x
    chunk = -(-total // _tp.world)
    if x.shape[-1] < chunk:
        x = F.pad(x, (0, chunk - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in range(_tp.world)]
    dist.all_gather(parts, x.contiguous(), group=_tp.group)
    return torch.cat(parts, dim=-1)[..., :total]


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of `size` items: ceil(size / world) each, the last rank's possibly shorter
    (only the vocabulary may split unevenly; `local_size` checks the rest)."""
    n = -(-size // world)
    return min(size, rank * n), min(size, (rank + 1) * n)


def local_size(size: int, what: str | None = None) -> int:
    """This rank's share of `size`; `what` names a dimension that must split evenly (heads, experts, columns)."""
    if what is not None and size % _tp.world:
        raise ValueError(f"{what} ({size}) does not split evenly over {_tp.world} tensor-parallel ranks")
    start, stop = shard_range(size, _tp.rank, _tp.world)
    return stop - start


def check_splits(cfg: ModelConfig, world: int) -> None:
    """Raise ValueError unless heads, routed experts and MLP widths split evenly over `world` ranks."""
    sizes = {"num_attention_heads": cfg.num_attention_heads, "n_routed_experts": cfg.n_routed_experts,
             "intermediate_size": cfg.intermediate_size,
             "moe_intermediate_size * n_shared_experts": cfg.moe_intermediate_size * cfg.n_shared_experts}
    bad = [f"{k} ({v})" for k, v in sizes.items() if v % world]
    if bad:
        raise ValueError(f"tensor parallel size {world} must divide {', '.join(bad)}")


# -- the layers -------------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding over this rank's rows of the vocabulary; ids outside it give zeros, summed over ranks."""

    def __init__(self, vocab: int, dim: int) -> None:
        self.vocab_start, self.vocab_stop = shard_range(vocab, _tp.rank, _tp.world)
        super().__init__(self.vocab_stop - self.vocab_start, dim)
        self.sharded = _tp.world > 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return super().forward(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_stop)
        x = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside[..., None], 0.0))


def vocab_parallel_head(hidden: int, vocab: int) -> nn.Linear:
    """The LM head's rows of this rank (logits come back whole through `gather_last`)."""
    return nn.Linear(hidden, local_size(vocab), bias=False)


# -- what each rank loads ----------------------------------------------------------------------------------------
# Split along dim 0 (output features / heads / vocabulary rows) or dim 1 (input features), by module name suffix.
_COLUMN = re.compile(r"\.(self_attn\.(q_b_proj|q_proj|kv_b_proj)|(mlp|shared_experts)\.(gate_proj|up_proj))\.weight$")
_ROW = re.compile(r"\.(self_attn\.o_proj|(mlp|shared_experts)\.down_proj)\.weight$")
_VOCAB = re.compile(r"(embed_tokens\.weight|lm_head\.weight|shared_head\.head\.weight)$")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")  # one expert's tensor in a checkpoint
_STACKED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")  # all experts of a layer in the network


def _weight_name(name: str) -> str:
    """An FP8 checkpoint's `weight_scale_inv` blocks are split like their weight."""
    return name.removesuffix("_scale_inv")


def shard_spec(name: str, config: ModelConfig, rank: int, world: int) -> int | None:
    """The dim along which rank keeps its slice (`shard_range` of that dim) of tensor `name`, or None when every
    rank keeps it whole. `name` is a checkpoint name or a network parameter name (they differ only for routed
    experts): the network's stacked experts split on dim 0, their experts; one expert's checkpoint tensor is
    never sliced, its rank keeps it whole (see `owns`)."""
    if world == 1 or _EXPERT.search(name):
        return None
    name = _weight_name(name)
    if _COLUMN.search(name) or _VOCAB.search(name) or _STACKED.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None  # replicated, including a row-parallel bias (added once, after the all-reduce)


def owns(name: str, config: ModelConfig, rank: int, world: int) -> bool:
    """Whether rank loads checkpoint tensor `name` at all: False only for another rank's routed experts."""
    m = _EXPERT.search(name)
    if m is None or world == 1:
        return True
    start, stop = shard_range(config.n_routed_experts, rank, world)
    return start <= int(m.group(1)) < stop


def read_shard(st, name: str, dim: int | None, rank: int, world: int) -> torch.Tensor:
    """Read only rank's slice of a tensor from an open safetensors file (memory-mapped: the rest is never read)."""
    if dim is None:
        return st.get_tensor(name)
    sl = st.get_slice(name)
    start, stop = shard_range(sl.get_shape()[dim], rank, world)
    return sl[start:stop] if dim == 0 else sl[:, start:stop]
