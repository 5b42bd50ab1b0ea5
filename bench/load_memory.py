"""Peak host memory of one tensor-parallel rank while it loads its shard, against that rank's share of the weights.

    python bench/load_memory.py [--worlds 1 2 4] [--fp8] [--keep DIR]

Writes a random GlmMoeDsa checkpoint of a few hundred MB (bf16; `--fp8` also quantizes it with model.quantize and
loads that), then loads it once per (world size, rank), each in a fresh process with one torch thread, with the
issue's TP = EP layout (q_b/kv_b by heads, o_proj and down row-parallel, experts E/N per rank, embedding and LM head
by vocabulary; the rest replicated) through `load_model(shards=...)`. A sampler thread reads /proc/self/status every
millisecond: RssAnon is the process's own memory (tensors), RssFile the checkpoint pages it touched through the
memory map (page cache, shared by every rank on the node and reclaimable). Rows: share = the bytes of the tensors
the rank ends up holding; anon peak over share should stay near 1 (plus the largest single slice in flight).
Writes bench/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, meta, print_table, thread_env, write_result

CONFIG = dict(  # ~135M parameters: ~270 MB in bf16
    architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", vocab_size=32000, hidden_size=512,
    intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=8, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, kv_lora_rank=256,
    q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, first_k_dense_replace=1,
    index_topk=64, index_head_dim=64, index_n_heads=4, max_position_embeddings=4096, num_nextn_predict_layers=1,
    rope_theta=10000.0,
)

COLUMNS = [("world", "world", "d"), ("rank", "rank", "d"), ("share_mib", "share MiB", ".1f"),
           ("anon_peak_mib", "anon peak MiB", ".1f"), ("anon_over_share", "anon/share", ".2f"),
           ("file_peak_mib", "file-mapped peak MiB", ".1f"), ("hwm_mib", "VmHWM MiB", ".1f"),
           ("baseline_mib", "RSS before MiB", ".1f"), ("seconds", "load s", ".2f")]


def tp_plan(names: list[str], rank: int, world: int) -> dict:
    from model.shard import ShardSpec

    row, col = ShardSpec(0, rank, world), ShardSpec(1, rank, world)
    plan = {}
    for n in names:
        if n in ("model.embed_tokens.weight", "lm_head.weight") or n.endswith(
                ("q_b_proj.weight", "kv_b_proj.weight", "experts.gate_up_proj", "experts.down_proj")):
            plan[n] = row
        elif n.endswith("o_proj.weight"):
            plan[n] = col
        elif ".mlp." in n and ".experts." not in n and n.endswith(("gate_proj.weight", "up_proj.weight")):
            plan[n] = row
        elif ".mlp." in n and ".experts." not in n and n.endswith("down_proj.weight"):
            plan[n] = col
    return plan


def write_checkpoint(out: Path, fp8: bool) -> Path:
    import torch

    from model.config import ModelConfig
    from model.loader import save_checkpoint
    from model.network import GlmMoeDsaForCausalLM

    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(ModelConfig.from_dict(CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    save_checkpoint(model, out / "bf16", dtype=torch.bfloat16)
    if not fp8:
        return out / "bf16"
    from model.quantize import quantize_checkpoint

    quantize_checkpoint(out / "bf16", out / "fp8")
    return out / "fp8"


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(path: Path, world: int, rank: int) -> dict:
    import torch

    from model.loader import load_model
    from model.network import GlmMoeDsaForCausalLM
    from model.shard import shrink_to_shards

    torch.set_num_threads(1)
    from model.config import ModelConfig

    with torch.device("meta"):
        names = list(GlmMoeDsaForCausalLM(ModelConfig.from_dir(path)).state_dict())
    plan = tp_plan(names, rank, world)
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            for k in ("RssAnon", "RssFile"):
                peak[k] = max(peak[k], s[k])
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    model = load_model(path, torch.bfloat16, shards=plan,
                       build=lambda cfg: shrink_to_shards(GlmMoeDsaForCausalLM(cfg), plan))
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    end = _status()
    for k in ("RssAnon", "RssFile"):
        peak[k] = max(peak[k], end[k])
    share = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    mib = 1 << 20
    return {"world": world, "rank": rank, "share_mib": share / mib,
            "anon_peak_mib": (peak["RssAnon"] - base["RssAnon"]) / mib,
            "anon_over_share": (peak["RssAnon"] - base["RssAnon"]) / share,
            "file_peak_mib": (peak["RssFile"] - base["RssFile"]) / mib, "hwm_mib": end["VmHWM"] / mib,
            "baseline_mib": base["VmRSS"] / mib, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--fp8", action="store_true", help="load a model.quantize'd copy (dequantized to bf16 on CPU)")
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "WORLD", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), int(args.child[2]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        path = write_checkpoint(root, args.fp8)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows = []
        for world in args.worlds:
            for rank in range(world):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), str(world), str(rank)],
                                     capture_output=True, text=True, env=thread_env(1), cwd=ROOT, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    name = args.name or ("load_memory_fp8" if args.fp8 else "load_memory")
    print_table(f"Peak host memory per rank while loading its shard ({size / 2**20:.0f} MiB "
                f"{'FP8' if args.fp8 else 'bf16'} checkpoint, bf16 model)", COLUMNS, rows)
    worst = max(r["anon_over_share"] for r in rows)
    print(f"wrote {write_result(name, rows, meta(1, checkpoint_mib=size / 2**20), {'max_anon_over_share': worst})}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
