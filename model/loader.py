"""Hugging Face safetensors checkpoints in and out: single file or sharded, per-expert names, the MTP layer at
``model.layers.{num_hidden_layers}``. Tensors are memory-mapped and converted to the target dtype once.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import parallel
from .config import ModelConfig
from .network import GlmMoeDsaForCausalLM
from .parallel import VocabParallelEmbedding, vocab_parallel_head

log = logging.getLogger("glm_serve.model")

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config: lists every problem at once."""


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            names.update({k: f for k in st.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return names


def _progress(done: int, total: int, every: int) -> None:
    if total >= every and (done == total or done % every == 0):
        print(f"\rloading weights {done}/{total} ({100 * done // total}%)", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress_every: int = 2000) -> GlmMoeDsaForCausalLM:
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    files = _tensor_files(path)
    L = cfg.num_hidden_layers
    mtp_prefix = f"model.layers.{L}."
    if cfg.num_mtp_layers and not any(k.startswith(mtp_prefix) for k in files):
        log.warning("%s has no MTP weights (%s*): speculative decoding is unavailable", path, mtp_prefix)
        cfg.num_nextn_predict_layers = 0
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(cfg)
    for depth in range(cfg.num_mtp_layers):
        layer = model.model.layers[L + depth]
        prefix = f"model.layers.{L + depth}."
        if prefix + "embed_tokens.weight" in files:
            with torch.device("meta"):
                layer.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        if prefix + "shared_head.head.weight" in files:
            with torch.device("meta"):
                layer.shared_head.head = vocab_parallel_head(cfg.hidden_size, cfg.vocab_size)
    model.to_empty(device=device)
    model.rotary.inv_freq.copy_(1.0 / (cfg.rope_theta ** (
        torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float32, device=device) / cfg.qk_rope_head_dim)))

    targets = dict(model.state_dict(keep_vars=True))
    expected = set(_hf_names(model))
    # Under tensor parallelism each rank loads only its slice of a tensor, and none of another rank's experts.
    rank, world = parallel.tp().rank, parallel.tp().world
    missing = sorted(expected - files.keys())
    unexpected = sorted(k for k in files.keys() - expected if parallel.owns(k, cfg, rank, world))
    problems = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]

    by_file: dict[Path, list[str]] = {}
    for name in sorted(expected & files.keys()):
        by_file.setdefault(files[name], []).append(name)
    done, total = 0, len(expected & files.keys())
    first = _first_expert(model)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, "pt", device="cpu") as st:
                for name in names:
                    t = parallel.read_shard(st, name, parallel.shard_spec(name, cfg, rank, world), rank, world)
                    dst = _destination(targets, name, first)
                    if tuple(t.shape) != tuple(dst.shape):
                        problems.append(f"shape: {name} is {tuple(t.shape)}, expected {tuple(dst.shape)}")
                    else:
                        dst.copy_(t)
                    done += 1
                    _progress(done, total, progress_every)
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))
    # One conversion; the router's selection bias stays fp32 (it only ranks experts).
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def _first_expert(model: GlmMoeDsaForCausalLM) -> int:
    """The model's index of this rank's first routed expert (0 without expert parallelism)."""
    cfg = model.config
    return parallel.shard_range(cfg.n_routed_experts, parallel.tp().rank, parallel.tp().world)[0]


def _destination(targets: dict[str, torch.Tensor], name: str, first_expert: int = 0) -> torch.Tensor:
    m = _EXPERT.match(name)
    if not m:
        return targets[name]
    prefix, e, kind = m.group(1), int(m.group(2)) - first_expert, m.group(3)
    if kind == "down_proj":
        return targets[f"{prefix}.down_proj"][e]
    gate_up = targets[f"{prefix}.gate_up_proj"][e]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if kind == "gate_proj" else gate_up[half:]


def _hf_names(model: GlmMoeDsaForCausalLM) -> Iterator[str]:
    first = _first_expert(model)
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(first, first + t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight"
                yield f"{prefix}.{e}.up_proj.weight"
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(first, first + t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight"
        else:
            yield name


def hf_state_dict(model: GlmMoeDsaForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, experts split per expert."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    first = _first_expert(model)
    for name in _hf_names(model):
        t = _destination(sd, name, first).detach()
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        out[name] = t.contiguous().cpu()
    return out


def save_checkpoint(model: GlmMoeDsaForCausalLM, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the layout transformers reads (and writes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.config.raw)
    cfg["num_nextn_predict_layers"] = model.config.num_mtp_layers
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = out / "model.safetensors"
    save_file(hf_state_dict(model, dtype), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; a container's non-root user must read it
