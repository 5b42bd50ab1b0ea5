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

from model.batch import ForwardBatch
from model.kv_cache import KVCache
from model.network import GlmMoeDsaForCausalLM

from .block_manager import cdiv
from .config import EngineConfig
from .outputs import TokenLogprob
from .sampler import Sampler, SamplingState, compute_logprobs
from .sequence import Sequence, SequenceGroup
from .speculative import Verified, verify_drafts


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
                 dtype: torch.dtype, generator: torch.Generator | None = None, num_speculative_tokens: int = 0
                 ) -> None:
        self.model = model
        self.num_speculative_tokens = num_speculative_tokens
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.cache = KVCache(model.config, num_blocks, block_size, dtype, device)
        self.sampler = Sampler(generator)  # unseeded rows draw from the engine's seeded generator

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, ForwardBatch]:
        """Token ids [N] and the ForwardBatch of one step."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            ids += seq.input_token_ids(start, start + n)
            positions += range(start, start + n)
            slots += seq.slots(range(start, start + n), self.block_size)
        width = max(len(seq.block_table) for seq, _ in scheduled)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in scheduled]

        def t(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)

        fb = ForwardBatch(
            positions=t(positions), query_lens=[n for _, n in scheduled],
            context_lens=[seq.num_computed_tokens + n for seq, n in scheduled],
            block_tables=t(tables), slot_mapping=t(slots), cache=self.cache,
        )
        return t(ids), fb

    def forward(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """Normed hidden states [N, H]; writes this step's tokens into every main layer's cache."""
        return self.model(input_ids, fb)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        input_ids, fb = self.prepare(scheduled)
        hidden = self.forward(input_ids, fb)
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
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            group = seq.group
            if seq.index == 0 and group.wants_prompt_logprobs:
                # Position p predicts prompt token p + 1; skip what an earlier (preempted) prefill collected.
                done = len(group.prompt_logprobs or [None])
                ps = [p for p in range(start, start + n) if done <= p + 1 < seq.num_prompt_tokens]
                if ps:
                    prompt_rows.append((group, ps[0] + 1, list(range(len(rows), len(rows) + len(ps))),
                                        [seq.prompt_token_ids[p + 1] for p in ps]))
                    rows += [offset + p - start for p in ps]
            drafts = len(seq.draft_token_ids)
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
        logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)])
        for group, first, idx, token_ids in prompt_rows:
            k = group.params.prompt_logprobs or 0
            lps = compute_logprobs(logits[torch.tensor(idx, device=logits.device)], token_ids, k)
            result.prompt_logprobs.append((group, first, lps))
        if targets and all(s.params.argmax_only and s.params.logprobs is None for s, _ in targets):
            # The common greedy batch: one argmax, no per-row sampling tensors (grammar rows: of the masked logits).
            rows_logits = logits[torch.tensor([r for _, r in targets], device=logits.device)]
            bitmask = self._grammar_bitmask([s for s, _ in targets], logits.shape[-1])
            if bitmask is not None:
                from .structured import apply_bitmask

                rows_logits = apply_bitmask(rows_logits, *bitmask)  # a copy already (advanced indexing)
            best = rows_logits.argmax(dim=-1).tolist()
            result.samples = [(s, [t], [None]) for (s, _), t in zip(targets, best, strict=True)]
        elif targets:
            seqs = [s for s, _ in targets]
            state = SamplingState.of(seqs, self.device)
            state.bitmask = self._grammar_bitmask(seqs, logits.shape[-1])
            out = self.sampler.sample(logits[torch.tensor([r for _, r in targets], device=logits.device)], state)
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
