"""Tensor-parallel test helpers: run a function on N ranks (spawned processes, gloo on CPU, one thread each) and
the workloads whose outputs must not depend on the world size.

Each rank writes its outputs to `out/rank{r}.pt`; the tests compare every rank with every other and with a world
size 1 run of the same workload in the test process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from model import parallel
from model.batch import ForwardBatch
from model.kv_cache import KVCache
from model.loader import load_model

STEPS = 32  # greedy decode steps compared token by token
COLLECTIVE_TIMEOUT_S = 120.0  # a rank that waits this long on a peer fails instead of hanging the test


def _rank_main(rank: int, world: int, init_file: str, ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    parallel.init(rank, world, init_method=f"file://{init_file}", backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        result = workload(Path(ckpt))
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # Every rank done before any tears down: a gloo peer whose sockets close under it can abort ("terminate
        # called without an active exception"), which failed about one run in three on a 2-core EPYC.
        torch.distributed.barrier()
    finally:
        parallel.shutdown()


def run_ranks(ckpt: Path, world: int, tmp: Path, timeout_s: float = 600.0) -> list[Any]:
    """Run `workload` on `world` spawned ranks; returns each rank's result. Fails (killing the ranks) when a rank
    fails or the whole run exceeds `timeout_s`."""
    tmp.mkdir(parents=True, exist_ok=True)
    init_file = tmp / "rendezvous"
    ctx = mp.start_processes(_rank_main, args=(world, str(init_file), str(ckpt), str(tmp)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, f"{world} ranks did not finish in {timeout_s} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


# -- workloads ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def model_workload(ckpt: Path) -> dict[str, Any]:
    """The model alone: one prompt past index_topk prefilled into the cache, STEPS greedy decode steps (all
    logits kept), and two recursive MTP steps over the prompt when the checkpoint has an MTP layer."""
    model = load_model(ckpt)
    cfg = model.config
    P = 24
    ids = torch.randint(2, cfg.vocab_size, (P,), generator=torch.Generator().manual_seed(3))
    cache = KVCache(cfg, num_blocks=(P + STEPS) // 4 + 2, block_size=4, dtype=torch.float32)
    hidden = model(ids, ForwardBatch.single(P, 0, cache))
    logits = [model.logits(hidden)]
    tokens = [int(logits[-1][-1].argmax())]
    for step in range(STEPS - 1):
        h = model(torch.tensor(tokens[-1:]), ForwardBatch.single(1, P + step, cache))
        logits.append(model.logits(h))
        tokens.append(int(logits[-1][-1].argmax()))
    out: dict[str, Any] = {"tokens": tokens, "logits": torch.cat(logits)}
    if model.has_mtp:
        first = model.mtp(ids[1:], hidden[:-1], ForwardBatch.single(P - 1))
        second = model.mtp(ids[2:], first[:-1], ForwardBatch.single(P - 2))
        out["mtp_logits"] = torch.cat([model.mtp_logits(first), model.mtp_logits(second)])
    return out


def engine_workload(ckpt: Path, **engine_kw: Any) -> dict[str, Any]:
    """The engine's own step code (scheduler, model runner, sampler, MTP drafts with K = 2 when the checkpoint
    has an MTP layer): a batch of prompts of several lengths past index_topk, a greedy n = 2 request and a seeded
    sampled n = 2 request, STEPS tokens each with logprobs."""
    from service.engine.sampling_params import SamplingParams
    from tests.engine_fixtures import make_engine, prompts, run_engine

    engine = make_engine(ckpt, num_speculative_tokens=2, max_num_batched_tokens=48, **engine_kw)
    vocab = engine.model_config.vocab_size
    greedy = dict(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts(4, [5, 13, 24, 31], vocab=vocab, seed=1)):
        engine.add_request(f"g{i}", p, SamplingParams(**greedy))
    engine.add_request("n2", prompts(1, [17], vocab=vocab, seed=2)[0], SamplingParams(**greedy, n=2))
    engine.add_request("s2", prompts(1, [11], vocab=vocab, seed=3)[0],
                       SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=STEPS, ignore_eos=True,
                                      logprobs=2))
    try:
        results = run_engine(engine)
    finally:
        engine.close()
    return {
        "tokens": {rid: {i: c.token_ids for i, c in ch.items()} for rid, ch in results.items()},
        "logprobs": {rid: {i: [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs] for i, c in ch.items()}
                     for rid, ch in results.items()},
        "drafts": engine.stats().spec_num_draft_tokens, "accepted": engine.stats().spec_num_accepted_tokens,
    }


def workload(ckpt: Path) -> dict[str, Any]:
    """Both, in one run of the ranks (spawning them costs more than either)."""
    return {"model": model_workload(ckpt), "engine": engine_workload(ckpt)}


def _engine_main(ckpt: str, world: int, out: str) -> None:
    torch.set_num_threads(1)
    result = engine_workload(Path(ckpt), tensor_parallel_size=world, torch_threads=1)
    torch.save(result, Path(out) / "engine.pt")


def run_tp_engine(ckpt: Path, world: int, tmp: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """`engine_workload` through `LLMEngine` at --tensor-parallel-size `world`: rank 0 (the engine, in a spawned
    process so this one's torch.distributed state stays clean) spawns its workers itself."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = mp.get_context("spawn").Process(target=_engine_main, args=(str(ckpt), world, str(tmp)))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the engine at tensor parallel {world} did not finish in {timeout_s} s")
    assert proc.exitcode == 0, f"the engine process failed (exit code {proc.exitcode})"
    return torch.load(tmp / "engine.pt")
