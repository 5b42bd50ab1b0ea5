"""Host memory per tensor-parallel rank while loading: each rank's peak RSS growth against its share of the weights.

    python bench/tp_memory.py [--worlds 1 2 4] [--out-name tp_memory]

Writes a random GLM-5-layout checkpoint (about 90M parameters, fp32: expert-heavy, like the real model), then
for each world size spawns the ranks (gloo, one thread each) and has each load it with `load_model`, which
reads only the rank's slice of every tensor from the memory-mapped files. Per rank: the bytes of the parameters
it holds (its share: 1/N of the split tensors plus the replicated ones), the private memory it still holds after
loading (RssAnon growth), and the growth of its peak RSS from just before loading to just after (VmHWM,
restarted before loading; file pages mapped while reading count while resident). No timing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import checkpoints
from common import meta, print_table, write_result

SIZE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, n_routed_experts=32,
            num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=4, first_k_dense_replace=1,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
COLUMNS = [("world", "world", "d"), ("rank", "rank", "d"), ("share_mb", "params MB", ".1f"),
           ("even_share_mb", "whole/N MB", ".1f"), ("kept_anon_mb", "kept anon MB", ".1f"),
           ("peak_growth_mb", "peak RSS growth MB", ".1f"), ("ratio", "peak growth/params", ".2f")]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(rank: int, world: int, init: str, ckpt: str, out: str) -> None:
    import torch

    from model import parallel
    from model.loader import load_model

    torch.set_num_threads(1)
    parallel.init(rank, world, init_method=f"file://{init}", backend="gloo")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) at the current RSS
        before, anon = _status_mb("VmRSS"), _status_mb("RssAnon")
        model = load_model(ckpt)
        peak, kept = _status_mb("VmHWM") - before, _status_mb("RssAnon") - anon
        share = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        torch.save({"rank": rank, "share_mb": share, "peak_growth_mb": peak, "kept_anon_mb": kept},
                   Path(out) / f"{rank}.pt")
    finally:
        parallel.shutdown()


def measure(ckpt: Path, world: int, tmp: Path) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    run = tmp / f"w{world}"
    run.mkdir()
    mp.start_processes(_rank, args=(world, str(run / "rendezvous"), str(ckpt), str(run)), nprocs=world,
                       start_method="spawn")
    return [torch.load(run / f"{r}.pt") for r in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out-name", default="tp_memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ckpt = checkpoints.glm_checkpoint(tmp / "ckpt", tokenizer=False, **SIZE)
        rows, whole = [], None
        for world in args.worlds:
            for r in measure(ckpt, world, tmp):
                whole = r["share_mb"] if world == 1 else whole
                rows.append({"world": world, **r, "even_share_mb": whole / world if whole else None,
                             "ratio": r["peak_growth_mb"] / r["share_mb"]})
    print_table("host memory per rank while loading (fp32)", COLUMNS, rows)
    write_result(args.out_name, rows, meta(threads=1, checkpoint=SIZE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
