"""CUDA graphs for decode and verify steps: the forward of a uniform batch replayed rather than relaunched.

On a GPU an eager decode step of a small model is kernel launches: about 600 operator calls a layer, 25 ms a step
for the shipped 8-layer model on an H200, whose captured step replays in 1.6 ms (bench/README.md, "`gpu.sh` on one
NVIDIA H200"). The forward reads nothing back to the host (tests/test_decode_sync_free.py), so it captures as it
is, for fixed shapes. A step whose sequences all have Q new tokens (decodes: Q = 1; a verify step of one depth:
Q = K + 1) is padded to a bucket: the batch to a power of two with idle rows (position 0, writing a scratch
cache block no sequence owns), the keys to a power of two (or to `index_topk`, so that contexts the indexer
leaves dense stay dense), hidden by the causal masks. Every host-side decision inside the forward (key limits,
whether the indexer runs) is taken from the bucket, never from the step, so one graph serves every step of its
bucket. A bucket's graph is captured on first use, after two eager runs that build the lazily made constants
outside it; later steps refill its input tensors in place and replay it. Trust is earned: a bucket's first step
runs both ways and keeps the graph only if its hidden states match the eager forward's (`matches`); a capture
that fails or disagrees leaves that bucket eager for good, with a warning. Prefill chunks and mixed batches run
eagerly. vLLM's CUDA graphs, in this engine's terms.

The MTP layer's draft steps take graphs of their own (`mtp=True`: one row per sequence, the previous step's
output a second static input): a draft depth is one decoder layer plus the head, as launch-bound on a GPU as a
main layer, and drafts that cost eager launches against a verify step that replays could never pay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.batch import ForwardBatch
from model.indexer import relu_floor
from model.kv_cache import KVCache
from model.network import GlmMoeDsaForCausalLM

if TYPE_CHECKING:
    from .step_inputs import StepInputs

WARMUP_RUNS = 2
log = logging.getLogger("glm_serve.engine")


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Bucket:
    ids: torch.Tensor  # [B * Q] static input ids
    fb: ForwardBatch  # static metadata, refilled each step
    hidden: torch.Tensor | None  # [B, H] static MTP input (the state each draft continues), MTP buckets only
    out: torch.Tensor | None = None  # static hidden states [B * Q, H] (set by the capture)
    graph: torch.cuda.CUDAGraph | None = None
    checked: bool = False  # its first step matched the eager forward
    broken: bool = False  # capture failed, or its first step did not match: eager from now on


def matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether the bucket's hidden states are the eager forward's: equal up to what reordered sums give (CUDA's
    atomic adds in index_add_, other kernels for another batch size), 2% of the rows' scale in the worst
    element; a stale input or constant is off by the scale itself."""
    scale = want.float().abs().amax().clamp(min=1e-6)
    return bool(((got.float() - want.float()).abs().amax() <= 0.02 * scale).item())


class GraphRunner:
    """The forward of uniform steps through per-bucket CUDA graphs. `capture=False` runs each bucket's forward
    eagerly on its static, refilled inputs instead: the same padding and refills, testable on the CPU. `mtp`: the
    MTP layer's draft step (`model.mtp`, one row per sequence) instead of the main forward."""

    def __init__(self, model: GlmMoeDsaForCausalLM, cache: KVCache, scratch_block: int, max_batch: int,
                 max_len: int, *, capture: bool = True, mtp: bool = False) -> None:
        self.model, self.cache, self.mtp = model, cache, mtp
        self.device = cache.latent[0].device
        self.scratch = scratch_block
        self.capture = capture
        bs = cache.block_size
        self.max_batch = next_pow2(max_batch)
        self.max_keys = -(-max_len // bs) * bs
        sizes, n = {self.max_keys}, bs
        while n < self.max_keys:  # a block, doubling
            sizes.add(n)
            n *= 2
        topk = model.config.index_topk
        if topk < self.max_keys and topk % bs == 0:
            sizes.add(topk)
        self.key_sizes = sorted(sizes)
        self.buckets: dict[tuple[int, int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps served from a bucket (stats, tests)
        # The indexer's tie-breaking floor grows by reallocation; a graph keeps the address it captured, so size it
        # once for the longest context now.
        relu_floor(self.max_keys, self.device)

    def bucket_of(self, step: StepInputs) -> tuple[int, int, int] | None:
        """(padded batch, Q, padded keys), or None for a step that runs eagerly (new-token counts differ)."""
        B, Q, T = step.num_seqs, step.query_lens[0], max(step.context_lens)
        if min(step.query_lens) != Q or max(step.query_lens) != Q or (self.mtp and Q != 1):
            return None
        if B > self.max_batch or Q > self.cache.block_size or T > self.max_keys:
            return None
        return next_pow2(B), Q, next(s for s in self.key_sizes if s >= T)

    def _forward(self, ids: torch.Tensor, hidden: torch.Tensor | None, fb: ForwardBatch) -> torch.Tensor:
        return self.model.mtp(ids, hidden, fb) if self.mtp else self.model(ids, fb)

    def run(self, input_ids: torch.Tensor, step: StepInputs, hidden: torch.Tensor | None = None
            ) -> torch.Tensor | None:
        """The hidden states [N, H] of the step (this step's tokens written into every main layer's cache; with
        `mtp`, the MTP layer's output for `hidden` and its entries written), or None when the step is not one a
        graph serves."""
        key = self.bucket_of(step)
        if key is None:
            return None
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = self._build(*key)
        if bucket.broken:
            return None
        N = input_ids.shape[0]
        bucket.ids[:N].copy_(input_ids)
        bucket.ids[N:].zero_()
        if bucket.hidden is not None:
            bucket.hidden[:N].copy_(hidden)
            bucket.hidden[N:].zero_()
        bucket.fb.refill(self._padded(step, *key))
        if bucket.graph is not None:
            bucket.graph.replay()
            out = bucket.out
        else:
            out = self._forward(bucket.ids, bucket.hidden, bucket.fb)
        result = out[:N].clone()  # the next replay of any bucket may write over `out` (one shared memory pool)
        if not bucket.checked:  # the first step both ways (the eager run rewrites the same cache entries)
            eager = self._forward(input_ids, hidden, step.batch(self.cache))
            if not matches(result, eager):
                bucket.broken = True
                log.warning("CUDA graph bucket %s disagrees with the eager forward: it runs eagerly", key)
                return eager
            bucket.checked = True
        self.replays += 1
        return result

    def _padded(self, step: StepInputs, Bc: int, Q: int, Tc: int) -> ForwardBatch:
        """`step` as a batch of Bc sequences and Tc keys: idle rows at positions 0..Q-1 in the scratch block."""
        B, bs, dev = step.num_seqs, self.cache.block_size, step.positions.device
        pad = Bc - B
        W = Tc // bs
        tables = torch.full((Bc, W), self.scratch, dtype=torch.long, device=dev)
        w = min(W, step.block_tables.shape[1])
        tables[:B, :w] = step.block_tables[:, :w]
        idle = torch.arange(Q, device=dev).repeat(pad)
        positions = torch.cat([step.positions, idle])
        slots = torch.cat([step.slot_mapping, self.scratch * bs + idle])
        return ForwardBatch(positions, [Q] * Bc, step.context_lens + [Q] * pad, tables, slots, self.cache,
                            allow_groups=False, key_len=Tc)

    def _build(self, Bc: int, Q: int, Tc: int) -> _Bucket:
        """The bucket's static inputs; with `capture`, its graph too. The static batch's host-side lengths are the
        bucket's (every context Tc), so the decisions the forward takes on them hold for every step it serves;
        its tensors are idle rows until a step refills them."""
        dev = self.device
        fb = self._idle_batch(Bc, Q, Tc)
        ids = torch.zeros(Bc * Q, dtype=torch.long, device=dev)
        hidden = self._hidden(Bc) if self.mtp else None
        bucket = _Bucket(ids, fb, hidden)
        if not self.capture:
            return bucket
        try:
            self._capture(bucket, Bc, Q, Tc)
        except Exception as e:  # an op that cannot be captured: this shape stays eager
            log.warning("CUDA graph capture of bucket %s failed (%s: %s): it runs eagerly", (Bc, Q, Tc),
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            bucket.broken = True
        return bucket

    def _capture(self, bucket: _Bucket, Bc: int, Q: int, Tc: int) -> None:
        dev, ids, fb = self.device, bucket.ids, bucket.fb
        side = torch.cuda.Stream(dev)  # warm up off the default stream, as torch's graph docs advise
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # eager: lazily built constants (rotation patterns, kernel checks) now
                self._forward(ids, bucket.hidden, self._idle_batch(Bc, Q, Tc))
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            bucket.out = self._forward(ids, bucket.hidden, fb)
        bucket.graph = graph

    def _hidden(self, Bc: int) -> torch.Tensor:
        """A static [Bc, H] MTP input in the model's dtype (zeros: idle rows)."""
        w = self.model.model.embed_tokens.weight
        return torch.zeros(Bc, w.shape[1], dtype=w.dtype, device=self.device)

    def _idle_batch(self, Bc: int, Q: int, Tc: int) -> ForwardBatch:
        """A batch of Bc idle rows (positions 0..Q-1 in the scratch block) whose host-side contexts are all Tc."""
        dev, bs = self.device, self.cache.block_size
        idle = torch.arange(Q, device=dev).repeat(Bc)
        tables = torch.full((Bc, Tc // bs), self.scratch, dtype=torch.long, device=dev)
        return ForwardBatch(idle, [Q] * Bc, [Tc] * Bc, tables, self.scratch * bs + idle, self.cache,
                            allow_groups=False, key_len=Tc)
