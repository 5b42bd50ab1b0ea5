"""Hugging Face safetensors checkpoints in and out: single file or sharded, per-expert names, the MTP layer at
``model.layers.{num_hidden_layers}``. Tensors are memory-mapped and converted to the target dtype once.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import fp8, parallel
from .config import ModelConfig
from .network import GlmMoeDsaForCausalLM
from .parallel import VocabParallelEmbedding, vocab_parallel_head
from .shard import ShardPlan, ShardSpec, spec_for, tensor_slices

log = logging.getLogger("glm_serve.model")

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
               progress_every: int = 2000, *, shards: ShardPlan | None = None, quantization: str | None = None,
               fp8_weights: str = "auto", build: Callable[[ModelConfig], GlmMoeDsaForCausalLM] | None = None
               ) -> GlmMoeDsaForCausalLM:
    """Build the network on the meta device, allocate it in `dtype` on `device`, and fill it from the checkpoint.

    shards: which slice of each parameter this rank holds (see model/shard.py); each tensor is read from the
        memory-mapped files already sliced, so a rank's host memory is its share, never the whole tensor.
    quantization: "fp8" quantizes the eligible weights of a bf16/fp32 checkpoint blockwise at load (an FP8
        checkpoint needs nothing: it is recognised by its tensors).
    fp8_weights: "keep" keeps FP8 weights FP8 (run by `layers.linear` through `fp8.fp8_linear`), "dequantize"
        converts them to `dtype` at load, one tensor at a time; "auto" keeps them on CUDA and dequantizes on CPU.
    build: makes the (meta) network from the config; the tensor-parallel network passes its own.
    """
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    fp8.check_quantization_config(cfg.raw, str(path / "config.json"))
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization {quantization!r} is not supported (only 'fp8')")
    if fp8_weights not in ("auto", "keep", "dequantize"):
        raise ValueError(f"fp8_weights {fp8_weights!r}: expected auto, keep or dequantize")
    device = torch.device(device)
    keep = fp8_weights == "keep" or (fp8_weights == "auto" and device.type == "cuda")
    files = _tensor_files(path)
    L = cfg.num_hidden_layers
    mtp_prefix = f"model.layers.{L}."
    if cfg.num_mtp_layers and not any(k.startswith(mtp_prefix) for k in files):
        log.warning("%s has no MTP weights (%s*): speculative decoding is unavailable", path, mtp_prefix)
        cfg.num_nextn_predict_layers = 0
    if shards is None and parallel.tp().world > 1:  # the network is built sharded: read this rank's slices
        rank, world = parallel.tp().rank, parallel.tp().world

        def shards(name: str) -> ShardSpec | None:
            dim = parallel.shard_spec(name, cfg, rank, world)
            return None if dim is None else ShardSpec(dim, rank, world)
    with torch.device("meta"):
        model = (build or GlmMoeDsaForCausalLM)(cfg)
    for depth in range(cfg.num_mtp_layers):
        layer = model.model.layers[L + depth]
        prefix = f"model.layers.{L + depth}."
        if prefix + "embed_tokens.weight" in files:
            with torch.device("meta"):
                layer.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        if prefix + "shared_head.head.weight" in files:
            with torch.device("meta"):
                layer.shared_head.head = vocab_parallel_head(cfg.hidden_size, cfg.vocab_size)
    for p in model.parameters():  # allocated in the serving dtype: no full-size fp32 copy on the way
        p.data = p.data.to(dtype)

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def open_file(f: Path) -> Any:
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, "pt", device="cpu"))
            return handles[f]

        stored_fp8 = {n for n in files if not n.endswith(fp8.SCALE_SUFFIX)
                      and open_file(files[n]).get_slice(n).get_dtype() == "F8_E4M3"}
        reads, skipped = _plan_reads(model, cfg, shards)
        problems = _check_names(files, reads, skipped, stored_fp8)
        to_quantize = {n for n in reads if quantization == "fp8" and n not in stored_fp8 and fp8.QUANTIZABLE.match(n)}
        fp8_params = _make_fp8(model, _fp8_params(reads, stored_fp8 | to_quantize) if keep else set())
        model.to_empty(device=device)
        model.tie_weights()  # to_empty makes new tensors: tie the head to the embedding again
        model.rotary.inv_freq.copy_(1.0 / (cfg.rope_theta ** (
            torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float32, device=device) / cfg.qk_rope_head_dim)))
        targets = dict(model.state_dict(keep_vars=True))
        for name, segments in fp8_params.items():
            fp8.attach_scale(targets[name], targets[name + fp8.SCALE_SUFFIX], segments)

        by_file: dict[Path, list[str]] = {}
        for name in sorted(reads.keys() & files.keys()):
            by_file.setdefault(files[name], []).append(name)
        done, total = 0, sum(map(len, by_file.values()))
        with torch.no_grad():
            for file, names in by_file.items():
                for name in names:
                    scale = None
                    if name in stored_fp8 and name + fp8.SCALE_SUFFIX in files:
                        scale = open_file(files[name + fp8.SCALE_SUFFIX]).get_slice(name + fp8.SCALE_SUFFIX)
                    problem = _read_one(open_file(file).get_slice(name), scale, reads[name], targets,
                                        name, name in to_quantize)
                    if problem:
                        problems.append(problem)
                    done += 1
                    _progress(done, total, progress_every)
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))
    if stored_fp8 or to_quantize:
        how = (f"kept FP8 ({len(fp8_params)} parameters; block-scaled matmul where the GPU has one, else "
               "dequantized per product)" if keep else f"dequantized to {str(dtype).removeprefix('torch.')} at load")
        log.info("fp8: %d block-scaled weights (%d stored FP8, %d quantized at load): %s",
                 len(stored_fp8 & reads.keys()) + len(to_quantize), len(stored_fp8 & reads.keys()),
                 len(to_quantize), how)
    return model.eval()


class _Read(NamedTuple):
    """Where one checkpoint tensor goes: a parameter (expert `expert` of a stack, gate or up half of gate|up) and
    the spec of the slice this rank reads from the stored tensor."""

    param: str
    expert: int | None
    half: str | None
    spec: ShardSpec | None


def _plan_reads(model: GlmMoeDsaForCausalLM, cfg: ModelConfig, plan: ShardPlan | None
                ) -> tuple[dict[str, _Read], set[str]]:
    """Checkpoint name -> its _Read for every tensor this rank needs; also the expert tensors other ranks own."""
    reads: dict[str, _Read] = {}
    skipped: set[str] = set()
    for name, t in model.state_dict().items():
        if name.endswith(fp8.SCALE_SUFFIX):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # the embedding's tensor; a copy is ignored
            skipped.add(name)
            continue
        spec = spec_for(plan, name)
        kinds = {"experts.gate_up_proj": (("gate_proj", "gate"), ("up_proj", "up")),
                 "experts.down_proj": (("down_proj", None),)}.get(name.split(".mlp.", 1)[-1])
        if kinds is None:
            reads[name] = _Read(name, None, None, spec)
            continue
        prefix = name.rsplit(".", 1)[0]
        E = cfg.n_routed_experts
        first, stop = spec.bounds(E) if spec is not None and spec.dim == 0 else (0, E)
        if stop - first != t.shape[0]:
            raise CheckpointError(f"{name}: {t.shape[0]} experts in the network, shard spec gives {stop - first}")
        inner = ShardSpec(spec.dim - 1, spec.rank, spec.world_size) if spec is not None and spec.dim > 0 else None
        for e in range(E):
            for file_kind, half in kinds:
                hf = f"{prefix}.{e}.{file_kind}.weight"
                if first <= e < stop:
                    reads[hf] = _Read(name, e - first, half, inner)
                else:
                    skipped.add(hf)
    return reads, skipped


def _check_names(files: dict[str, Path], reads: dict[str, _Read], skipped: set[str], stored_fp8: set[str]
                 ) -> list[str]:
    problems = [f"missing: {k}" for k in sorted(reads.keys() - files.keys())]
    scales = {n + fp8.SCALE_SUFFIX for n in stored_fp8}
    problems += [f"unexpected: {k}" for k in sorted(files.keys() - reads.keys() - skipped - scales)]
    problems += [f"float8 without its {fp8.SCALE_SUFFIX}: {n}" for n in sorted(stored_fp8)
                 if n + fp8.SCALE_SUFFIX not in files]
    return problems


def _fp8_params(reads: dict[str, _Read], quantized: set[str]) -> set[str]:
    """The parameters kept FP8: those any quantized checkpoint tensor goes to."""
    return {reads[n].param for n in quantized & reads.keys() if not reads[n].param.endswith(fp8.DEQUANTIZE_ALWAYS)}


def _make_fp8(model: GlmMoeDsaForCausalLM, names: set[str]) -> dict[str, tuple[int, ...] | None]:
    """On the meta network: turn these parameters into float8 and give each a `<name>_scale_inv` buffer. Returns
    each one's row segments: a stacked gate|up has two halves, each with its own scale blocks."""
    segments: dict[str, tuple[int, ...] | None] = {}
    for name in sorted(names):
        owner_name, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        p = getattr(owner, attr)
        *lead, R, C = p.shape
        segments[name] = (R // 2, R // 2) if attr == "gate_up_proj" else None
        rows = 2 * fp8.blocks(R // 2) if segments[name] else fp8.blocks(R)
        setattr(owner, attr, torch.nn.Parameter(torch.empty_like(p, dtype=fp8.FP8), requires_grad=False))
        owner.register_buffer(attr + fp8.SCALE_SUFFIX, torch.empty(*lead, rows, fp8.blocks(C), device="meta"))
    return segments


def _read_one(sl: Any, scale: Any, r: _Read, targets: dict[str, torch.Tensor], name: str, quantize: bool
              ) -> str | None:
    """Read one stored tensor's slice into its destination, converting FP8 as the destination needs. Returns a
    problem, or None."""
    shape = tuple(sl.get_shape())
    index = tensor_slices(shape, r.spec)
    dst = _destination(targets, r.param, r.expert, r.half)
    want = tuple(i.stop - i.start for i in index)
    if want != tuple(dst.shape):
        return f"shape: {name} is {shape}" + (f", shard {want}" if r.spec else "") + f", expected {tuple(dst.shape)}"
    t = sl[index]
    if dst.dtype == fp8.FP8:
        dst_scale = _destination(targets, r.param + fp8.SCALE_SUFFIX, r.expert, r.half)
        if scale is None:  # a float weight kept FP8: quantize this rank's slice
            q, s = fp8.quantize_blockwise(t)
            dst.copy_(q)
            dst_scale.copy_(s)
            return None
        for dim, i in enumerate(index):
            if i.start % fp8.BLOCK or (i.stop % fp8.BLOCK and i.stop != shape[dim]):
                return (f"shard: {name} rows/cols [{i.start}, {i.stop}) of dim {dim} break its {fp8.BLOCK}x"
                        f"{fp8.BLOCK} scale blocks; an FP8 weight kept FP8 needs {fp8.BLOCK}-aligned shards")
        dst.copy_(t)
        dst_scale.copy_(scale[tuple(fp8.block_range(i.start, i.stop) for i in index)])
    elif scale is not None:
        s = scale[tuple(fp8.block_range(i.start, i.stop) for i in index)]
        dst.copy_(fp8.dequantize_blockwise(t, s, offset=(index[0].start % fp8.BLOCK, index[1].start % fp8.BLOCK)))
    elif quantize:  # --quantization fp8 where weights are dequantized: the FP8 rounding, in the serving dtype
        dst.copy_(fp8.dequantize_blockwise(*fp8.quantize_blockwise(t)))
    else:
        dst.copy_(t)
    return None


def _destination(targets: dict[str, torch.Tensor], param: str, expert: int | None, half: str | None
                 ) -> torch.Tensor:
    t = targets[param]
    if expert is None:
        return t
    t = t[expert]
    if half is None:
        return t
    mid = t.shape[0] // 2
    return t[:mid] if half == "gate" else t[mid:]


def hf_state_dict(model: GlmMoeDsaForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, experts split per expert."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for name, r in _plan_reads(model, model.config, None)[0].items():
        t = _destination(sd, r.param, r.expert, r.half).detach()
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
