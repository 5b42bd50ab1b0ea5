"""`python -m model.quantize SRC DST`: write a block-FP8 copy of a bf16/fp32 checkpoint, in the layout DeepSeek-V3
and GLM-5-FP8 publish (float8_e4m3fn weights, an fp32 `weight_scale_inv` per 128x128 block, `quantization_config`
in config.json). Tensors are read and written one file at a time, so memory stays at one file's worth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import fp8

# Everything but the weights is copied as is (tokenizer, generation config, chat template, model card).
_SKIP = {"config.json", "model.safetensors.index.json"}


def quantize_checkpoint(src: str | Path, dst: str | Path) -> int:
    """Quantize every weight `fp8.QUANTIZABLE` names; returns how many were quantized."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors files")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    count = 0
    for f in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(f, "pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = st.get_tensor(name)
                if fp8.QUANTIZABLE.match(name) and t.dim() == 2 and t.is_floating_point():
                    out[name], out[name + fp8.SCALE_SUFFIX] = fp8.quantize_blockwise(t)
                    count += 1
                else:
                    out[name] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        (dst / f.name).chmod(0o644)
        weight_map.update({name: f.name for name in out})
    if (src / "model.safetensors.index.json").exists() or len(files) > 1:
        total = sum((dst / f.name).stat().st_size for f in files)
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config["quantization_config"] = fp8.quantization_config()
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in _SKIP:
            shutil.copy2(p, dst / p.name)
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="bf16/fp32 checkpoint directory")
    ap.add_argument("dst", type=Path, help="output directory (created)")
    args = ap.parse_args(argv)
    try:
        n = quantize_checkpoint(args.src, args.dst)
    except (OSError, ValueError) as e:
        print(f"model.quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dst}: {n} weights quantized to FP8 (128x128 blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
