"""GPU checks for one H100/H200 session (run through bench/gpu.sh). Imports only torch-side code: model/,
service/engine/ and, when installed, transformers; no web stack, no installs, no network.

    python bench/gpu_bench.py [--cpu-smoke] [--out-dir DIR] [--skip-hf] [--skip-1b]

1. copy bandwidth: device-to-device copy of 1 GiB ((read + write) bytes / time), the yardstick for MBU;
2. correctness: the default model (shipped weights, else random default config) on CUDA against CPU, fp32:
   max |logit diff| on a prompt longer than index_topk (DSA active) and greedy tokens of the engine; bf16 drift;
3. decode tokens/s, engine on CUDA bf16 at batch 1 and 32 (128-token prompts, 128 new tokens, greedy; the
   engine's defaults, so CUDA graphs and, for a checkpoint with an MTP layer, adaptive MTP): total output
   tokens/s and the median steady decode step;
4. the same with transformers generate() on the GPU (padded batch, bf16);
5. model bandwidth utilisation: (active weight bytes + cache bytes read) per decode step / step time / copy
   bandwidth; active weights count the experts a batch of B is expected to touch (uniform routing);
6. CUDA graphs for a decode step (forward + LM head) at a fixed context: host syncs under CUDA's sync debug mode,
   capture, replay's logits against eager's, eager vs replay time (skipped without CUDA).
Steps 3-5 run for the default model and for a ~1B-parameter random GlmMoeDsa config. `--cpu-smoke` runs all of
it on the CPU with small sizes to check the script. Writes DIR/gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.batch import ForwardBatch  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.kv_cache import KVCache  # noqa: E402
from model.loader import load_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import LLMEngine  # noqa: E402
from service.engine.sampling_params import SamplingParams  # noqa: E402

ONE_B = dict(  # ~1.1B parameters, ~0.45B active per token
    architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", vocab_size=32768, hidden_size=2048,
    intermediate_size=5632, moe_intermediate_size=768, num_hidden_layers=12, first_k_dense_replace=1,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    kv_lora_rank=512, q_lora_rank=768, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_topk=2048,
    index_head_dim=128, index_n_heads=16, max_position_embeddings=4096, rope_parameters={"rope_theta": 1e6,
                                                                                           "rope_type": "default"},
    initializer_range=0.02, eos_token_id=0, pad_token_id=0, bos_token_id=None, num_nextn_predict_layers=0,
)
SMOKE_1B = {**ONE_B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
            "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "index_head_dim": 16,
            "index_n_heads": 4, "index_topk": 16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float) -> float:
    n = int(gib * (1 << 30)) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / sorted(times)[len(times) // 2] / 1e9  # GB/s, read + write


def random_checkpoint(cfg: dict, out: Path, device: str) -> Path | None:
    """Write a random checkpoint with transformers (the GPU comparison needs its model anyway); None without it."""
    try:
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    with torch.device(device):
        model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**cfg)).to(torch.bfloat16 if device != "cpu" else torch.float32)
    model.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data.update({k: cfg[k] for k in ("index_topk", "num_nextn_predict_layers")})
    (out / "config.json").write_text(json.dumps(data))
    del model
    return out


def count_params(cfg: dict) -> dict:
    from model.network import GlmMoeDsaForCausalLM

    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(ModelConfig.from_dict(cfg))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    c = model.config
    active = total - experts + experts * c.num_experts_per_tok // c.n_routed_experts
    return {"total": total, "active_per_token": active}


def correctness(path: Path, device: str) -> dict:
    cpu = load_model(path, torch.float32, "cpu").eval()
    gpu = load_model(path, torch.float32, device).eval()
    cfg = cpu.config
    T = min(cfg.index_topk * 3, cfg.max_position_embeddings)
    ids = torch.randint(16, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = cpu.logits(cpu(ids, ForwardBatch.single(T)))
        got = gpu.logits(gpu(ids.to(device), ForwardBatch.single(T, device=device))).cpu()
        bf = load_model(path, torch.bfloat16, device).eval()
        got_bf = bf.logits(bf(ids.to(device), ForwardBatch.single(T, device=device))).cpu()
    del cpu, gpu, bf
    prompts = [ids[i * 37:i * 37 + 60].tolist() for i in range(4)]
    toks = {}
    for dev in ("cpu", device):
        eng = LLMEngine.from_config(EngineConfig(model=path, device=dev, dtype="float32", max_num_seqs=4,
                                                 max_model_len=128, kv_cache_tokens=4 * 128))
        toks[dev] = run_engine(eng, prompts, 32)[1]
        del eng
    return {"tokens": T, "max_abs_logit_diff_fp32": (got - ref).abs().max().item(),
            "max_abs_logit_diff_bf16": (got_bf - ref).abs().max().item(),
            "argmax_agree_fp32": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "argmax_agree_bf16": (got_bf.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "greedy_same_fp32": f"{sum(a == b for a, b in zip(toks['cpu'], toks[device], strict=True))}/4"}


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[float], list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    steps = []
    dev = engine.runner.device.type
    while engine.has_unfinished():
        t = time.perf_counter()
        for o in engine.step():
            out[o.request_id] += o.outputs[0].token_ids if o.outputs else []
        sync(dev)
        steps.append(time.perf_counter() - t)
    return steps, [out[str(i)] for i in range(len(prompts))]


def active_bytes(model, batch: int) -> int:
    """Weight bytes one decode step reads: everything but the embedding table, routed experts scaled to the
    share a batch of `batch` tokens is expected to touch (uniform routing)."""
    cfg = model.config
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** batch)
    total = 0
    for name, p in model.named_parameters():
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= cfg.num_hidden_layers:
            continue  # the MTP layer does not run in plain decode
        if name.endswith("embed_tokens.weight"):
            continue
        nbytes = p.numel() * p.element_size()
        total += nbytes * touched / E if ".experts." in name else nbytes
    return int(total)


def decode_bench(path: Path, device: str, dtype: str, batches: list[int], prompt_len: int, new: int, bw: float
                 ) -> list[dict]:
    rows = []
    for B in batches:
        eng = LLMEngine.from_config(EngineConfig(model=path, device=device, dtype=dtype, max_num_seqs=B,
                                                 max_model_len=prompt_len + new + 8,
                                                 kv_cache_tokens=B * (prompt_len + new + 16)))
        vocab = eng.model_config.vocab_size
        g = torch.Generator().manual_seed(B)
        prompts = [torch.randint(16, vocab, (prompt_len,), generator=g).tolist() for _ in range(B)]
        run_engine(eng, prompts[:1], 4)  # warm-up
        t = time.perf_counter()
        steps, toks = run_engine(eng, prompts, new)
        wall = time.perf_counter() - t
        steady = sorted(steps[len(steps) // 4:-2] or steps)
        step_s = steady[len(steady) // 2]
        ctx = prompt_len + new // 2
        bytes_step = active_bytes(eng.model, B) + B * ctx * KVCache.bytes_per_token(eng.model_config,
                                                                                     eng.runner.dtype)
        rows.append({"batch": B, "engine_tok_s": sum(map(len, toks)) / wall, "decode_step_ms": step_s * 1000,
                     "decode_tok_s": B / step_s, "bytes_per_step_mb": bytes_step / 1e6,
                     "mbu": bytes_step / step_s / (bw * 1e9) if bw else None})
        del eng
    return rows


def hf_bench(path: Path, device: str, batches: list[int], prompt_len: int, new: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = hf.config.vocab_size
    out = {}
    for B in batches:
        ids = torch.randint(16, vocab, (B, prompt_len), generator=torch.Generator().manual_seed(B)).to(device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), **{**kw, "max_new_tokens": 2,
                                                                                    "min_new_tokens": 2})
            sync(device)
            t = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            sync(device)
        out[B] = B * new / (time.perf_counter() - t)
    del hf
    return out


def decode_inputs(cfg: ModelConfig, batch: int, ctx: int, dtype: torch.dtype, device: str, block_size: int = 16
                  ) -> tuple[torch.Tensor, ForwardBatch]:
    """One decode step of `batch` sequences at position `ctx` (context ctx + 1) in a fresh paged cache: the token
    ids and the ForwardBatch, built ahead of the step as the engine's runner builds them."""
    blocks = -(-(ctx + 1) // block_size)
    cache = KVCache(cfg, batch * blocks, block_size, dtype, device)
    tables = torch.arange(batch * blocks, device=device).view(batch, blocks)
    pos = torch.full((batch,), ctx, device=device)
    slots = tables[:, ctx // block_size] * block_size + ctx % block_size
    fb = ForwardBatch(pos, [1] * batch, [ctx + 1] * batch, tables, slots, cache)
    ids = torch.randint(16, cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(batch)).to(device)
    return ids, fb


def sync_free_check(step) -> str:
    """Run `step` once under CUDA's sync debug mode set to error: "sync-free", or the first sync it hit."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        torch.cuda.synchronize()
        return "sync-free"
    except RuntimeError as e:
        return f"syncs: {str(e).splitlines()[0][:150]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def graph_verdict(graph_diff: float, eager_diff: float, scale: float) -> bool:
    """Graph replay gives eager's logits: bit-equal, or no further from them than two eager runs are from each
    other (CUDA's atomic adds in index_add_ reorder sums) and within 1e-3 of the logits' scale."""
    return graph_diff == 0.0 or graph_diff <= max(2 * eager_diff, 1e-3 * scale)


def cuda_graph_trial(path: Path, device: str, dtype: torch.dtype, batch: int, ctx: int, reps: int = 20) -> dict:
    """A decode step (forward + LM head) eager and captured in a CUDA graph at a fixed context: whether the
    eager step is free of host syncs, whether it captures, replay's logits vs eager's, and both times."""
    model = load_model(path, dtype, device).eval()
    ids, fb = decode_inputs(model.config, batch, ctx, dtype, device)

    def step() -> torch.Tensor:
        return model.logits(model(ids, fb))

    with torch.inference_mode():
        for _ in range(3):  # warm-up: lazily built masks, one-time kernel checks (grouped GEMM, FP8)
            first = step()
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            step()
        sync(device)
        eager = (time.perf_counter() - t) / reps
        res = {"batch": batch, "context": ctx, "eager_ms": eager * 1000}
        if not device.startswith("cuda"):
            return {**res, "graph": "skipped: no CUDA"}
        res["host_syncs"] = sync_free_check(step)
        want = step()  # replays rewrite the same cache slot, so every run sees the same context
        res["eager_vs_eager_max_abs"] = (want.float() - first.float()).abs().max().item()
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
        except Exception as e:  # a host sync inside the forward (e.g. .tolist()) makes it uncapturable
            res["graph"] = f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
            return res
        graph.replay()
        sync(device)
        diff = (out.float() - want.float()).abs().max().item()
        res.update(graph="captured", graph_vs_eager_max_abs=diff,
                   argmax_equal=bool(torch.equal(out.argmax(-1), want.argmax(-1))),
                   logits_equal=graph_verdict(diff, res["eager_vs_eager_max_abs"], want.float().abs().max().item()))
        t = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        sync(device)
        res["graph_ms"] = (time.perf_counter() - t) / reps * 1000
        res["eager_over_graph"] = res["eager_ms"] / res["graph_ms"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run everything on the CPU with small sizes")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-1b", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu-smoke for a CPU check of the script)")
    device = "cpu" if smoke else "cuda"
    dtype = "float32" if smoke else "bfloat16"
    if smoke:
        torch.set_num_threads(2)
    prompt_len, new, batches = (16, 8, [1, 4]) if smoke else (128, 128, [1, 32])
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)",
                 "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new}
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except ImportError:
        res["transformers"] = None
    tmp = tempfile.TemporaryDirectory(prefix="gpu-bench-")

    def step(name: str, fn):
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        print(f"[{time.perf_counter() - t:6.1f}s] {name}: {json.dumps(res[name], default=str)[:400]}", flush=True)

    step("copy_bandwidth_gbs", lambda: copy_bandwidth(device, 0.0625 if smoke else 1.0))
    bw = res["copy_bandwidth_gbs"] if isinstance(res["copy_bandwidth_gbs"], float) else None
    shipped = sorted(p.parent for p in (ROOT / "model" / "weights").glob("*/model.safetensors"))
    default = shipped[0] if shipped else None
    if default is None:
        from model.train import default_config

        default = random_checkpoint({**default_config(8192, None, [0], 0), "num_nextn_predict_layers": 0},
                                    Path(tmp.name) / "default", "cpu")
    res["default_model"] = str(default)
    models = {"default": default}
    if not args.skip_1b:
        cfg_1b = SMOKE_1B if smoke else ONE_B
        step("build_1b", lambda: str(random_checkpoint(cfg_1b, Path(tmp.name) / "1b", device)))
        if isinstance(res["build_1b"], str) and res["build_1b"] != "None":
            models["1b"] = Path(res["build_1b"])
            res["params_1b"] = count_params(cfg_1b)
    step("correctness", lambda: correctness(default, "cpu" if smoke else "cuda"))
    for name, path in models.items():
        step(f"decode_{name}", lambda path=path: decode_bench(path, device, dtype, batches, prompt_len, new, bw))
        if not args.skip_hf:
            step(f"hf_{name}", lambda path=path: hf_bench(path, device, batches, prompt_len, new))
        step(f"cuda_graph_{name}", lambda path=path: [cuda_graph_trial(
            path, device, torch.float32 if smoke else torch.bfloat16, B, prompt_len) for B in batches])
    rows = []
    for name in models:
        dec = res.get(f"decode_{name}")
        hf = res.get(f"hf_{name}") or {}
        if isinstance(dec, list):
            for r in dec:
                h = hf.get(r["batch"]) if isinstance(hf, dict) else None
                rows.append({"model": name, **r, "hf_tok_s": h, "engine_vs_hf": r["engine_tok_s"] / h if h else None})
    res["rows"] = rows
    print(f"\n{'model':>8} {'B':>3} {'engine tok/s':>12} {'step ms':>8} {'hf tok/s':>9} {'eng/hf':>7} {'MBU':>6}")
    for r in rows:
        hf_s = f"{r['hf_tok_s']:.1f}" if r["hf_tok_s"] else "-"
        ratio_s = f"{r['engine_vs_hf']:.2f}x" if r["engine_vs_hf"] else "-"
        mbu = f"{r['mbu']:.1%}" if r.get("mbu") is not None else "-"
        print(f"{r['model']:>8} {r['batch']:>3} {r['engine_tok_s']:>12.1f} {r['decode_step_ms']:>8.2f} {hf_s:>9} "
              f"{ratio_s:>7} {mbu:>6}")
    print(f"\n{'model':>8} {'B':>3} {'eager ms':>9} {'graph ms':>9} {'eager/graph':>11} {'logits eq':>9}  host syncs")
    for name in models:
        graphs = res.get(f"cuda_graph_{name}") or []
        for g in graphs if isinstance(graphs, list) else [graphs]:
            if isinstance(g, dict) and "graph_ms" in g:
                print(f"{name:>8} {g['batch']:>3} {g['eager_ms']:>9.2f} {g['graph_ms']:>9.2f} "
                      f"{g['eager_over_graph']:>10.2f}x {str(g['logits_equal']):>9}  {g['host_syncs']}")
            elif isinstance(g, dict):
                print(f"{name:>8} {g.get('batch', '-'):>3} {g.get('eager_ms', 0):>9.2f}  {g.get('graph', g)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / ("gpu-smoke.json" if smoke else "gpu.json")
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
