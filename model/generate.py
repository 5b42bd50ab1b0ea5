"""A small reference generator: one sequence, the paged cache, greedy or sampled. Tests and `python -m model`
use it; the engine (service/engine) is what serves."""

from __future__ import annotations

import math

import torch

from .batch import ForwardBatch
from .kv_cache import KVCache
from .network import GlmMoeDsaForCausalLM


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> int:
    """logits [V] -> token id. temperature 0 is greedy."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.inference_mode()
def generate(model: GlmMoeDsaForCausalLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: set[int] | frozenset = frozenset(),
             block_size: int = 16) -> list[int]:
    """Prefill the prompt, then decode one token per step from the cache. Returns the new token ids."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = len(prompt_ids) + max_new_tokens
    cache = KVCache(model.config, math.ceil(total / block_size), block_size, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor(prompt_ids, device=device)
    start, out = 0, []
    for _ in range(max_new_tokens):
        fb = ForwardBatch.single(len(ids), start, cache, device)
        hidden = model(ids, fb)
        token = sample_token(model.logits(hidden[-1]), temperature, top_k, top_p, gen)
        out.append(token)
        if token in stop_ids:
            break
        start += len(ids)
        ids = torch.tensor([token], device=device)
    return out
