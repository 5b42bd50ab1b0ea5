"""Tensor parallelism for the engine (vLLM V1's multiprocess executor shape): rank 0 is the engine.

Rank 0 owns the scheduler, block tables and sampling. Every call it makes into the model (a forward, the LM head,
an MTP step, a cache block copy) is first broadcast to the other ranks as the step's plan, over a gloo group: the
op, the batch metadata (positions, query and context lengths, block tables, slot mapping) and the shapes of its
tensor arguments, which follow over the model's group. Every rank then runs the same call on its own shard and
cache, so the collectives inside the model line up. Only rank 0 samples (the logits are gathered on every rank,
so the others could; they need not). While idle, rank 0 sends a heartbeat so the others' waits never time out;
a rank that stops answering makes a collective time out instead of hanging.

One node: `ParallelExecutor.start` spawns ranks 1..N-1 as `python -m service.engine.parallel_executor`. Several
nodes (`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`, or torchrun's MASTER_ADDR / MASTER_PORT):
node 0 serves HTTP and spawns its ranks 1..k-1 (k = N / nnodes); every other node runs `glm-serve` with its
`--node-rank`, which serves nothing and spawns its k ranks (`run_node`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model import parallel
from model.batch import ForwardBatch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.loader import load_model
from model.network import GlmMoeDsaForCausalLM

from .config import EngineConfig

log = logging.getLogger("glm_serve.engine")

HEARTBEAT_S = 10.0  # an idle rank 0 says so this often; well inside the collectives' timeout
COLLECTIVE_TIMEOUT_S = 120.0
WORKER_STOP_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_meta(fb: ForwardBatch) -> dict[str, Any]:
    cpu = (lambda t: t.cpu() if t is not None else None)  # noqa: E731
    return {"positions": fb.positions.cpu(), "query_lens": fb.query_lens, "context_lens": fb.context_lens,
            "block_tables": cpu(fb.block_tables), "slot_mapping": cpu(fb.slot_mapping),
            "cached": fb.cache is not None, "allow_groups": fb.allow_groups}


def _batch(meta: dict[str, Any], cache: KVCache | None, device: torch.device) -> ForwardBatch:
    dev = (lambda t: t.to(device) if t is not None else None)  # noqa: E731
    return ForwardBatch(dev(meta["positions"]), meta["query_lens"], meta["context_lens"], dev(meta["block_tables"]),
                        dev(meta["slot_mapping"]), cache if meta["cached"] else None,
                        allow_groups=meta["allow_groups"])


class _Plan:
    """The broadcast itself: a header object over the gloo group, then the tensors over the model's group."""

    def __init__(self, group: parallel.TPGroup) -> None:
        self.tp = group

    def send(self, op: str, tensors: list[torch.Tensor] = (), **kw: Any) -> None:
        header = [(op, [(tuple(t.shape), t.dtype) for t in tensors], kw)]
        dist.broadcast_object_list(header, src=0, group=self.tp.cpu_group)
        for t in tensors:
            dist.broadcast(t.contiguous(), src=0, group=self.tp.group)

    def receive(self, device: torch.device) -> tuple[str, list[torch.Tensor], dict[str, Any]]:
        header: list[Any] = [None]
        dist.broadcast_object_list(header, src=0, group=self.tp.cpu_group)
        op, metas, kw = header[0]
        tensors = []
        for shape, dtype in metas:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=0, group=self.tp.group)
            tensors.append(t)
        return op, tensors, kw


class BroadcastModel:
    """Rank 0's model: the network's inference interface, each call broadcast to the other ranks first."""

    def __init__(self, model: GlmMoeDsaForCausalLM, plan: _Plan) -> None:
        self.model = model
        self.plan = plan

    def __getattr__(self, name: str) -> Any:  # config, has_mtp, ...: the local model's
        return getattr(self.model, name)

    def __call__(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        self.plan.send("forward", [input_ids], fb=_batch_meta(fb))
        return self.model(input_ids, fb)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.plan.send("logits", [hidden])
        return self.model.logits(hidden)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch, depth: int = 0) -> torch.Tensor:
        self.plan.send("mtp", [next_ids, hidden], fb=_batch_meta(fb), depth=depth)
        return self.model.mtp(next_ids, hidden, fb, depth)

    def mtp_fill_cache(self, next_ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch, depth: int = 0) -> None:
        self.plan.send("mtp_fill", [next_ids, hidden], fb=_batch_meta(fb), depth=depth)
        self.model.mtp_fill_cache(next_ids, hidden, fb, depth)

    def mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        self.plan.send("mtp_logits", [hidden], depth=depth)
        return self.model.mtp_logits(hidden, depth)


class ParallelExecutor:
    """Rank 0's side: joins the group, spawns this node's other ranks, relays the engine's model calls."""

    def __init__(self, config: EngineConfig, workers: list[subprocess.Popen]) -> None:
        self.config = config
        self.workers = workers
        self.plan = _Plan(parallel.tp())
        self.last_sent = time.monotonic()

    @classmethod
    def start(cls, config: EngineConfig) -> ParallelExecutor:
        """Spawn this node's other ranks and join them as rank 0 (before the model is built: it shards)."""
        world = config.tensor_parallel_size
        parallel.check_splits(ModelConfig.from_dir(config.model), world)  # before any process starts
        config = rendezvous(config)
        init_method = f"tcp://{config.master_addr}:{config.master_port}"
        workers = spawn_local_ranks(config, init_method)
        try:
            parallel.init(0, world, init_method, timeout_s=COLLECTIVE_TIMEOUT_S)
        except BaseException:
            for w in workers:
                w.kill()
            raise
        log.info("tensor parallel: %d ranks over %d node(s), rendezvous %s (rank 0 here, this node's workers %s)",
                 world, config.nnodes, init_method, [w.pid for w in workers])
        return cls(config, workers)

    def attach(self, engine) -> None:
        """Route the engine's model calls through the plan; the other ranks build the same cache."""
        runner = engine.runner
        cache = runner.cache
        self.send("cache", num_blocks=cache.num_blocks, block_size=cache.block_size)
        runner.model = BroadcastModel(runner.model, self.plan)
        if engine.proposer is not None:  # the MTP drafter calls the model itself
            engine.proposer.model = runner.model
        copy_blocks = runner.copy_blocks

        def copy_and_tell(pairs: list[tuple[int, int]]) -> None:
            if pairs:
                self.send("copy_blocks", pairs=pairs)
            copy_blocks(pairs)

        runner.copy_blocks = copy_and_tell

    def send(self, op: str, **kw: Any) -> None:
        self.plan.send(op, **kw)
        self.last_sent = time.monotonic()

    def heartbeat(self) -> None:
        """Called by the engine loop while idle: keeps the other ranks' waits inside their timeout."""
        self.check_workers()
        if time.monotonic() - self.last_sent >= HEARTBEAT_S / 2:
            self.send("idle")

    def check_workers(self) -> None:
        """Raise if a rank of this node has exited (its collectives would fail, or time out, anyway)."""
        for rank, w in enumerate(self.workers, start=1):
            if w.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited (exit code {w.returncode})")

    def shutdown(self) -> None:
        try:
            self.send("stop")
        except Exception:  # a rank already gone: kill the rest below
            log.warning("tensor parallel: could not tell the workers to stop")
        for w in self.workers:
            try:
                w.wait(WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        parallel.shutdown()


def rendezvous(config: EngineConfig) -> EngineConfig:
    """Fill in the rendezvous address: flags, else torchrun's MASTER_ADDR / MASTER_PORT, else (one node) this
    host and a free port."""
    addr = config.master_addr or os.environ.get("MASTER_ADDR")
    port = config.master_port or (int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None)
    if config.nnodes > 1 and (addr is None or port is None):
        raise ValueError("several nodes need --master-addr and --master-port (node 0's address and a free port)")
    return dataclasses.replace(config, master_addr=addr or "127.0.0.1", master_port=port or _free_port())


def spawn_local_ranks(config: EngineConfig, init_method: str, first: int = 1) -> list[subprocess.Popen]:
    """Start this node's headless ranks from `first` to the node's last."""
    per_node = config.tensor_parallel_size // config.nnodes
    spec = json.dumps({**dataclasses.asdict(config), "model": str(config.model)})
    last = (config.node_rank + 1) * per_node
    return [subprocess.Popen([sys.executable, "-m", "service.engine.parallel_executor", "--rank", str(r),
                              "--world", str(config.tensor_parallel_size), "--init-method", init_method,
                              "--config", spec]) for r in range(first, last)]


def run_node(config: EngineConfig) -> int:
    """A node other than 0 (`--node-rank` > 0): no HTTP, no engine, only its ranks, until rank 0 stops them.
    Returns the exit code (non-zero when a rank failed)."""
    config = rendezvous(config)
    init_method = f"tcp://{config.master_addr}:{config.master_port}"
    first = config.node_rank * (config.tensor_parallel_size // config.nnodes)
    ranks = spawn_local_ranks(config, init_method, first)
    log.info("node %d: tensor-parallel ranks %d..%d, rendezvous %s", config.node_rank, first,
             first + len(ranks) - 1, init_method)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    try:
        return max((r.wait() for r in ranks), key=abs)
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()


def run_worker(rank: int, world: int, init_method: str | None, config: EngineConfig) -> None:
    """A headless rank: build its shard, then run every call rank 0's plan names until told to stop."""
    from .model_runner import ModelRunner, resolve_device_dtype

    device, dtype = resolve_device_dtype(config)
    if device.type == "cpu" and config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    group = parallel.init(rank, world, init_method, timeout_s=COLLECTIVE_TIMEOUT_S)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model = load_model(config.model, dtype, device)
    plan, runner = _Plan(group), None
    with torch.inference_mode():
        while True:
            op, tensors, kw = plan.receive(device)
            if op == "stop":
                break
            if op == "cache":  # rank 0's cache size (it sized it from its free memory)
                runner = ModelRunner(model, kw["num_blocks"], kw["block_size"], device, dtype)
            elif op == "forward":
                model(tensors[0], _batch(kw["fb"], runner.cache, device))
            elif op == "logits":
                model.logits(tensors[0])
            elif op == "mtp":
                model.mtp(tensors[0], tensors[1], _batch(kw["fb"], runner.cache, device), kw["depth"])
            elif op == "mtp_fill":
                model.mtp_fill_cache(tensors[0], tensors[1], _batch(kw["fb"], runner.cache, device), kw["depth"])
            elif op == "mtp_logits":
                model.mtp_logits(tensors[0], kw["depth"])
            elif op == "copy_blocks":
                runner.copy_blocks(kw["pairs"])
            elif op != "idle":
                raise RuntimeError(f"unknown plan op {op!r}")
    parallel.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a headless tensor-parallel rank of glm-serve")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("RANK", -1)))
    ap.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 0)))
    ap.add_argument("--init-method", default=None, help="default: env:// (MASTER_ADDR, MASTER_PORT)")
    ap.add_argument("--config", required=True, help="the engine config, as JSON")
    args = ap.parse_args(argv)
    if not 0 < args.rank < args.world:
        ap.error("--rank must be in 1 .. --world - 1 (rank 0 is the engine)")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [rank {args.rank}] "
                                                   "%(message)s")
    fields = json.loads(args.config)
    config = EngineConfig(**{**fields, "model": Path(fields["model"])})
    try:
        run_worker(args.rank, args.world, args.init_method, config)
    except Exception as e:  # rank 0 gone or a collective timed out: nothing to serve
        log.error("rank %d stops: %s: %s", args.rank, type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
