"""A decode step's forward (model/*.py) never waits for the device: the CPU proxy for CUDA's sync debug mode.

Every call that reads device data back to the host (`.item()`, `.tolist()`, truth tests, `int()`), makes a shape
depend on values (`nonzero`, boolean indexing, `unique`, `bincount`, `repeat_interleave` without output_size)
or copies host data in (`torch.tensor`, a number assigned through index tensors) is patched to raise while the
network runs a decode batch (ragged contexts past index_topk, so DSA selects; MoE layers; the LM head; an MTP
draft step), and a verification batch of 3 tokens per sequence. The ForwardBatch is built before, as the
engine's runner builds it ahead of the step; the first step runs unpatched (warm-up, as a CUDA graph is captured
after warm-up), because the grouped GEMM's one-time capability check reads a value back.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from model.batch import ForwardBatch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.network import GlmMoeDsaForCausalLM

CFG = dict(model_type="glm_moe_dsa", vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=24,
           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, index_topk=8, index_head_dim=16, index_n_heads=4,
           first_k_dense_replace=1, max_position_embeddings=512, num_nextn_predict_layers=1)
BLOCK = 4


class HostSync(AssertionError):
    pass


def _refuse(name: str):
    def raiser(*args, **kwargs):
        raise HostSync(f"{name} in the decode forward")
    return raiser


def _is_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def no_host_sync(mp: pytest.MonkeyPatch):
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
                 "bincount", "unique", "unique_consecutive", "masked_select", "argwhere"):
        mp.setattr(torch.Tensor, name, _refuse(f"Tensor.{name}"))
    for name in ("nonzero", "bincount", "unique", "unique_consecutive", "masked_select", "argwhere", "tensor",
                 "as_tensor"):
        mp.setattr(torch, name, _refuse(f"torch.{name}"))
    get, put, rep, where = torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.repeat_interleave, torch.where

    def getitem(self, idx):
        if _is_bool_index(idx):
            raise HostSync("boolean indexing in the decode forward")
        return get(self, idx)

    def setitem(self, idx, value):
        if _is_bool_index(idx):
            raise HostSync("boolean index assignment in the decode forward")
        items = idx if isinstance(idx, tuple) else (idx,)
        if not isinstance(value, torch.Tensor) and any(isinstance(i, torch.Tensor) for i in items):
            # index_put_ wraps the number in a host tensor and copies it over: not allowed in CUDA graph capture
            raise HostSync("a number assigned through index tensors (a host-to-device copy)")
        return put(self, idx, value)

    def repeat_interleave(x, repeats=None, *args, **kwargs):
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            raise HostSync("repeat_interleave without output_size")
        return rep(x, repeats, *args, **kwargs)

    def where_(cond, *args, **kwargs):
        if not args and not kwargs:
            raise HostSync("torch.where(cond) (nonzero)")
        return where(cond, *args, **kwargs)

    mp.setattr(torch.Tensor, "__getitem__", getitem)
    mp.setattr(torch.Tensor, "__setitem__", setitem)
    mp.setattr(torch, "repeat_interleave", repeat_interleave)
    mp.setattr(torch, "where", where_)
    try:
        yield
    finally:
        mp.undo()


def tiny_model(dtype: torch.dtype) -> GlmMoeDsaForCausalLM:
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(ModelConfig.from_dict(CFG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.to(dtype).eval()


def decode_setup(model, contexts: list[int], q: int = 1):
    """Prefill each sequence's prompt (contexts[b] - q tokens) into a fresh cache, then build the batch of q new
    tokens per sequence (q = 1: decode; q = K + 1: verifying K drafts) ending at position contexts[b] - 1."""
    cfg = model.config
    B = len(contexts)
    per_seq = -(-max(contexts) // BLOCK)
    cache = KVCache(cfg, B * per_seq, BLOCK, next(model.parameters()).dtype)
    tables = torch.arange(B * per_seq).view(B, per_seq)
    g = torch.Generator().manual_seed(1)

    def batch(starts: list[int], stops: list[int]) -> ForwardBatch:
        pos = torch.cat([torch.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        seq = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(starts, stops, strict=True))])
        slots = tables[seq, pos // BLOCK] * BLOCK + pos % BLOCK
        return ForwardBatch(pos, [b - a for a, b in zip(starts, stops, strict=True)], list(stops), tables, slots,
                            cache)

    prompt = [c - q for c in contexts]
    with torch.inference_mode():
        model(torch.randint(2, cfg.vocab_size, (sum(prompt),), generator=g), batch([0] * B, prompt))
    return torch.randint(2, cfg.vocab_size, (B * q,), generator=g), batch(prompt, list(contexts))


def decode_step(model, ids, fb) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        hidden = model(ids, fb)
        logits = model.logits(hidden)
        draft = model.mtp_logits(model.mtp(logits.argmax(-1), hidden, fb))
    return logits, draft


@pytest.mark.parametrize("dtype,q", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)])
def test_decode_step_has_no_host_sync(monkeypatch, dtype, q):
    model = tiny_model(dtype)
    contexts = [23, 9, 17]  # past index_topk = 8: the indexer scores and selects for every sequence
    ids, fb = decode_setup(model, contexts, q)
    want = decode_step(model, ids, fb)  # warm-up (and the reference)
    with no_host_sync(monkeypatch):
        got = decode_step(model, ids, fb)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert all(m.experts.impl == "auto" for m in model.modules() if hasattr(m, "experts"))


def test_the_guard_catches_the_expert_loop(monkeypatch):
    """The proxy has teeth: the per-expert loop (the fallback for FP8 weights) reads the counts back and is caught."""
    model = tiny_model(torch.float32)
    ids, fb = decode_setup(model, [12, 10])
    decode_step(model, ids, fb)
    for m in model.modules():
        if hasattr(m, "experts"):
            m.experts.impl = "loop"
    with no_host_sync(monkeypatch):
        with pytest.raises(HostSync, match="tolist"):
            decode_step(model, ids, fb)
        t = torch.arange(4.0)
        for sync in (lambda: t[t > 1], lambda: bool(t.sum()), lambda: t.max().item(), lambda: torch.where(t > 1),
                     lambda: torch.bincount(t.long(), minlength=8), lambda: t.nonzero()):
            with pytest.raises(HostSync):
                sync()
