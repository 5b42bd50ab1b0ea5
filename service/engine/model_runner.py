"""One engine step on the device: flat batch metadata -> network -> logits of the rows that sample -> tokens.

The batch is the scheduler's (sequence, new tokens) list packed into one ragged `ForwardBatch`, built once per
step as a handful of tensors. Only rows that need a distribution go through the LM head: the last token of a
sequence whose new tokens reach its end (a finished prefill chunk or a decode), plus prompt rows of a request
that asked for prompt logprobs. `prepare`, `forward` and `sample` stay separate so speculative decoding can
run the MTP layer over the same step's hidden states in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import cpu_layout
from model.kv_cache import KVCache
from model.layers import skinny_wx_pays
from model.network import GlmMoeDsaForCausalLM

from .block_manager import cdiv
from .config import EngineConfig
from .outputs import TokenLogprob
from .sampler import Sampler, SamplingState, argmax_rows, compute_logprobs
from .sequence import Sequence, SequenceGroup
from .speculative import Verified, verify_drafts
from .step_inputs import StepInputs


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """auto = cuda + bfloat16 when a GPU is present, else cpu + float32."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif config.dtype in dtypes:
        dtype = dtypes[config.dtype]
    else:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {config.dtype!r}")
    return torch.device(device), dtype


def graph_mode(config: EngineConfig, device: torch.device) -> str | None:
    """"capture": decode and verify steps replay CUDA graphs (cuda_graphs.py). Not on the CPU, not with
    `enforce_eager`, and not with tensor parallelism (the other ranks follow rank 0's model calls one by one)."""
    if device.type != "cuda" or config.enforce_eager or config.tensor_parallel_size > 1:
        return None
    return "capture"


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30  # no /proc (not Linux): assume a modest machine


def num_cache_blocks(config: EngineConfig, model: GlmMoeDsaForCausalLM, max_model_len: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """Blocks from kv_cache_tokens, else from a fraction of free memory, never more than max_num_seqs full-length
    sequences can use (a bigger cache would only hold zeros)."""
    bs = config.block_size
    if config.kv_cache_tokens is not None:
        return max(1, cdiv(config.kv_cache_tokens, bs))
    per_block = KVCache.bytes_per_token(model.config, dtype) * bs
    by_memory = int(_free_memory(device) * config.kv_cache_memory_fraction) // per_block
    return max(1, min(by_memory, config.max_num_seqs * cdiv(max_model_len, bs)))


@dataclass
class StepResult:
    """New tokens, in target order: (sequence, token ids, their logprob entries if asked). A plain step gives
    one token per sequence; a verify step gives the accepted drafts plus one more."""

    samples: list[tuple[Sequence, list[int], list[TokenLogprob | None]]] = field(default_factory=list)
    # Prompt logprobs computed this step, per request: (first prompt position they cover, entries).
    prompt_logprobs: list[tuple[SequenceGroup, int, list[TokenLogprob]]] = field(default_factory=list)
    # Speculative decoding: the sequences whose drafts were verified (their tokens are in `samples` too).
    verified: list[Verified] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # the step's hidden states, for the MTP layer's catch-up


class ModelRunner:
    def __init__(self, model: GlmMoeDsaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, generator: torch.Generator | None = None, num_speculative_tokens: int = 0,
                 graphs: str | None = None, max_num_seqs: int = 1, max_model_len: int = 0) -> None:
        """graphs: "capture" replays uniform steps from CUDA graphs (cuda_graphs.py), "emulate" runs the same
        padding and refills eagerly (tests on the CPU), None runs every step eagerly."""
        self.model = model
        self.num_speculative_tokens = num_speculative_tokens
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        # With graphs, one block more than the block manager hands out: the scratch block idle rows write.
        self.cache = KVCache(model.config, num_blocks + (graphs is not None), block_size, dtype, device)
        self.graphs = None
        if graphs is not None:
            from .cuda_graphs import GraphRunner

            self.graphs = GraphRunner(model, self.cache, num_blocks, max_num_seqs, max_model_len,
                                      capture=graphs == "capture")
        # The MTP layer's draft steps, with graphs of their own (handed to the MTPProposer).
        self.draft_graphs = None
        if graphs is not None and num_speculative_tokens and model.has_mtp:
            self.draft_graphs = GraphRunner(model, self.cache, num_blocks, max_num_seqs, max_model_len,
                                            capture=graphs == "capture", mtp=True)
        self.sampler = Sampler(generator)  # unseeded rows draw from the engine's seeded generator
        if device.type == "cpu":  # time the skinny-product paths now (~0.1 s), not in the first request's step
            for tall in (False, True):
                skinny_wx_pays(dtype, tall)
            if cpu_layout.applies(model):  # float32: weights stored for x @ W^T from memory (model/cpu_layout.py)
                cpu_layout.set_transposed(model)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, StepInputs]:
        """Token ids [N] and the flat inputs of one step (ForwardBatch's arguments, built into one by `forward`).

        Python touches each sequence once (its start, length, table and new token ids); positions and slots
        are expanded per token by tensor ops, so a step's Python does not grow with prefill chunk lengths and a
        decode row costs a few list appends."""
        ids: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            if n == 1 and not seq.draft_token_ids:  # a decode: its one input is its last known token
                ids.append(seq.token_at(start))
            else:
                ids += seq.input_token_ids(start, start + n)
            starts.append(start)
            query_lens.append(n)
            tables.append(seq.block_table)
        width = max(map(len, tables))
        tables = [tb if len(tb) == width else tb + [0] * (width - len(tb)) for tb in tables]
        B, N, bs = len(scheduled), len(ids), self.block_size
        lens = torch.tensor(query_lens)
        row = torch.repeat_interleave(torch.arange(B), lens, output_size=N)  # each token's sequence
        first = torch.cumsum(lens, 0) - lens  # each sequence's first flat index
        positions = torch.tensor(starts)[row] + torch.arange(N) - first[row]
        block_tables = torch.tensor(tables, dtype=torch.long)
        slots = block_tables[row, positions // bs] * bs + positions % bs

        def dev(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, non_blocking=True)

        step = StepInputs(dev(positions), query_lens, [s + n for s, n in zip(starts, query_lens, strict=True)],
                          dev(block_tables), dev(slots))
        return dev(torch.tensor(ids, dtype=torch.long)), step

    def forward(self, input_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Normed hidden states [N, H]; writes this step's tokens into every main layer's cache. A step a CUDA
        graph serves never builds its own ForwardBatch (the graph's padded one is refilled instead)."""
        if self.graphs is not None:
            hidden = self.graphs.run(input_ids, step)
            if hidden is not None:
                return hidden
        return self.model(input_ids, step.batch(self.cache))

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        input_ids, step = self.prepare(scheduled)
        hidden = self.forward(input_ids, step)
        result = self.sample(scheduled, hidden)
        result.hidden = hidden
        return result

    def sample(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> StepResult:
        result = StepResult()
        rows: list[int] = []  # flat rows that go through the LM head
        targets: list[tuple[Sequence, int]] = []  # (sequence that samples, index into rows)
        verifying: list[tuple[Sequence, int]] = []  # (sequence with drafts, its first row)
        prompt_rows: list[tuple[SequenceGroup, int, list[int], list[int]]] = []
        offset = 0
        all_decodes = True  # every sequence took the decode path below: `rows` is 0, 1, ... in target order
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            group = seq.group
            drafts = len(seq.draft_token_ids)
            if n == 1 and not drafts and group.params.n == 1 and group.params.prompt_logprobs is None:
                # The common decode row (also a one-token last prefill chunk): samples from its only row.
                if start + 1 == seq.num_tokens:
                    targets.append((seq, len(rows)))
                    rows.append(offset)
                offset += 1
                continue
            all_decodes = False
            if seq.index == 0 and group.wants_prompt_logprobs:
                # Position p predicts prompt token p + 1; skip what an earlier (preempted) prefill collected.
                done = len(group.prompt_logprobs or [None])
                ps = [p for p in range(start, start + n) if done <= p + 1 < seq.num_prompt_tokens]
                if ps:
                    prompt_rows.append((group, ps[0] + 1, list(range(len(rows), len(rows) + len(ps))),
                                        [seq.prompt_token_ids[p + 1] for p in ps]))
                    rows += [offset + p - start for p in ps]
            if drafts and start + n == seq.num_tokens + drafts:
                rows += range(offset, offset + n)  # verify: every position's distribution
                verifying.append((seq, len(rows) - n))
            elif start + n == seq.num_tokens:
                rows.append(offset + n - 1)
                # An n>1 request's other choices draw their first token from the same prefill logits.
                for s in [seq, *group.forking]:
                    targets.append((s, len(rows) - 1))
            offset += n
        if not rows:
            return result
        # Every row samples (all decodes): the hidden states go through the LM head as they are, no gather.
        every_row = all_decodes and len(rows) == hidden.shape[0]
        logits = self.model.logits(hidden if every_row else hidden[torch.tensor(rows, device=hidden.device)])
        for group, first, idx, token_ids in prompt_rows:
            k = group.params.prompt_logprobs or 0
            lps = compute_logprobs(logits[torch.tensor(idx, device=logits.device)], token_ids, k)
            result.prompt_logprobs.append((group, first, lps))
        if targets and all(s.params.argmax_only and s.params.logprobs is None for s, _ in targets):
            # The common greedy batch: one argmax, no per-row sampling tensors (grammar rows: of the masked logits).
            rows_logits = logits if every_row else logits[torch.tensor([r for _, r in targets], device=logits.device)]
            bitmask = self._grammar_bitmask([s for s, _ in targets], logits.shape[-1])
            if bitmask is not None:
                from .structured import apply_bitmask

                # In place: on a copy (advanced indexing makes one; the gather-free batch needs its own).
                rows_logits = apply_bitmask(rows_logits.clone() if every_row else rows_logits, *bitmask)
            best = argmax_rows(rows_logits).tolist()
            result.samples = [(s, [t], [None]) for (s, _), t in zip(targets, best, strict=True)]
        elif targets:
            seqs = [s for s, _ in targets]
            state = SamplingState.of(seqs, self.device)
            state.bitmask = self._grammar_bitmask(seqs, logits.shape[-1])
            # (the sampler never writes into its input: the gather-free batch passes the logits themselves)
            picked = logits if every_row else logits[torch.tensor([r for _, r in targets], device=logits.device)]
            out = self.sampler.sample(picked, state)
            result.samples = [(s, [t], [lp]) for s, t, lp in zip(seqs, out.token_ids, out.logprobs, strict=True)]
        if verifying:
            result.verified = verify_drafts(verifying, logits, self.sampler, self.num_speculative_tokens)
            result.samples += [(v.seq, v.tokens, v.logprobs) for v in result.verified]
        return result

    @staticmethod
    def _grammar_bitmask(seqs: list[Sequence], vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
        """The allowed-token bitmask of every grammar-constrained row, from each row's matcher."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        from .structured import allocate_bitmask

        bitmask = allocate_bitmask(len(seqs), vocab_size)
        for i in rows:
            seqs[i].grammar.fill(bitmask, i)
        return bitmask, rows

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole cache blocks src -> dst in every layer (an n>1 fork's partial prompt block)."""
        self.cache.copy_blocks(pairs)
