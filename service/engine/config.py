"""Engine configuration: what the CLI settings hand to the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class EngineConfig:
    model: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None  # None: sized from kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.2  # of free device memory (CPU: of available RAM)
    block_size: int = 16
    # MTP speculative decoding (checkpoints with an MTP layer; others ignore it): up to K drafts per step, the
    # depth chosen each step from measured acceptance and step cost ("adaptive"), or always K ("fixed"); K = 0:
    # off. On by default with K = 3 (room for the policy, a bound on a wrong pick): on the shipped 8-layer model
    # adaptive K <= 3 measured 1.24x / 1.09x / 1.02x of K = 0 at batch 1 / 8 / 32 on code, 1.33x / 1.09x / 0.97x
    # on prose, against 1.07x / 1.14x / 1.05x and 1.21x / 1.10x / 0.96x for K <= 2 in the same runs; greedy tokens
    # identical (bench/speculative.py --ab --ab-k 2 3; bench/README.md, "Adaptive depth up to 3").
    num_speculative_tokens: int = 3
    speculative_policy: str = "adaptive"  # adaptive | fixed
    quantization: str | None = None  # "fp8": block-quantize a bf16/fp32 checkpoint at load
    # CUDA: decode and verify steps replay per-shape CUDA graphs (cuda_graphs.py) unless this is set (vLLM's flag)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "builtin"  # builtin | sha256 (see prefix_cache.py)
    seed: int = 0
    # Detokenize and check stop strings in the engine's step. EngineClient turns it off and does both in the API
    # process instead (output_processor.py); an in-process LLMEngine (tests, benches) keeps it on.
    detokenize: bool = True
    # CPU only: torch intra-op threads (process-wide). None leaves torch's default. On a small CPU, threads that
    # spin-wait for the event loop's core cost more than they compute (measured in bench/http_overhead.py).
    torch_threads: int | None = None
    # Tensor + expert parallel ranks (TP = EP, DP = 1); rank 0 runs the engine, the others follow its plan. Over
    # several nodes each runs tensor_parallel_size / nnodes ranks; node 0 holds rank 0 and the rendezvous.
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # None: $MASTER_ADDR, else this host (one node)
    master_port: int | None = None  # None: $MASTER_PORT, else a free port (one node)
