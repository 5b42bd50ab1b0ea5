"""Engine test fixtures: a tiny random checkpoint (written by transformers, via tests/model_fixtures.py) with a
byte-level BPE tokenizer, and helpers that run an engine to completion and check it leaked nothing.

`initializer_range` 0.1 makes random logits peaked, so greedy choices are decisive; 16 indexer heads (keys that
score exactly 0 tie, and model/indexer.py's floor orders them: tests/test_engine_dsa.py); a small
`index_topk` (8) puts most prompts in the sparse regime; 320 tokens leave room for the tokenizer's vocabulary.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.engine.speculative import MTPProposer
from tests import model_fixtures

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    first_k_dense_replace=1, index_topk=8, index_head_dim=16, index_n_heads=16, max_position_embeddings=256,
    initializer_range=0.1, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    bos_token_id=None, eos_token_id=0, pad_token_id=0,
)
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ", "def forward(self, x):\n    return x + 1\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, émoji 🙂 and more. ", "hello world, hello engine, hello cache. ",
] * 20


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE trained on a few lines; multi-byte characters span several tokens (detokenizer tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[0], "pad_token": SPECIALS[0],
           "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [0], "pad_token_id": 0}))


def make_checkpoint(out: Path, *, seed: int = 0, mtp: bool = True, tokenizer: bool = True, **overrides) -> Path:
    """A transformers checkpoint of `TINY` (+ `overrides`), with an MTP layer and a tokenizer unless told not to."""
    model_fixtures.make_checkpoint(out, mtp=mtp, seed=seed, **{**TINY, **overrides})
    if tokenizer:
        build_tokenizer(out, overrides.get("vocab_size", TINY["vocab_size"]))
    return out


def hf_model(path: Path):
    """The transformers oracle in fp32 eager (it ignores the MTP layer's weights, and says so: silenced)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return model_fixtures.hf_model(path)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, one request alone, eos off."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int, lengths: list[int], vocab: int = 320, seed: int = 0) -> list[list[int]]:
    """`n` random prompts cycling through `lengths` (token 0, the eos, is avoided)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


# -- engine helpers -----------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """One choice of a request, accumulated from its delta outputs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_outputs: int = 0


def accumulate(results: dict[str, dict[int, Choice]], outputs) -> None:
    for out in outputs:
        choices = results.setdefault(out.request_id, {})
        for c in out.outputs:
            ch = choices.setdefault(c.index, Choice())
            assert ch.finish_reason is None, f"{out.request_id}#{c.index}: output after its finish"
            ch.token_ids += c.token_ids
            ch.text += c.text
            ch.logprobs += c.logprobs or []
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
            ch.num_outputs += 1


def make_engine(path: Path, **overrides):
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    # Plain decoding and a fixed draft depth unless a test asks otherwise (the server default is adaptive MTP).
    settings = dict(device="cpu", dtype="float32", kv_cache_tokens=4096, block_size=4, num_speculative_tokens=0,
                    speculative_policy="fixed")
    return LLMEngine.from_config(EngineConfig(model=path, **{**settings, **overrides}))


def run_engine(engine, max_steps: int = 10_000) -> dict[str, dict[int, Choice]]:
    """Step until every request has finished; returns the accumulated choices."""
    results: dict[str, dict[int, Choice]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        accumulate(results, engine.step())
    raise AssertionError("the engine did not finish")


def assert_no_leaks(engine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts), "cache blocks leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


async def until(cond, timeout: float = 10.0) -> None:
    """Wait (polling) for `cond()` to hold; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def parked(thread: threading.Thread | None) -> bool:
    """Whether `thread` sits in threading's Condition.wait() without a timeout (directly, or under Event.wait or
    queue.Queue.get): it runs again only when notified, so it neither spins nor polls."""
    frame = sys._current_frames().get(thread.ident) if thread is not None else None
    while frame is not None:
        if frame.f_code is threading.Condition.wait.__code__:
            return frame.f_locals.get("timeout") is None
        frame = frame.f_back
    return False


async def collect(engine, rid: str, prompt: list[int], params) -> list:
    """Every output of one request streamed by an EngineClient-like `engine`."""
    return [out async for out in engine.generate(rid, prompt, params)]


def greedy(max_tokens: int, **kw):
    from service.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)



class OracleDrafts(MTPProposer):
    """Drafts the true greedy continuation (`truth[request_id]`, set by the test) with every fifth position
    corrupted, so verification accepts and rejects at every draft position (a random tiny MTP layer is almost
    never right); the MTP catch-up still runs. Draft distributions are one-hot, or None (greedy drafts) in a
    subclass with `one_hot_q = False`."""

    truth: dict[str, list[int]] = {}
    one_hot_q = True

    def _draft(self, seqs, z, max_model_len):
        V = self.model.config.vocab_size
        for s in seqs:
            done = len(s.output_token_ids)
            true = self.truth[s.request_id][done : done + self.draft_budget(s, max_model_len)]
            s.draft_token_ids = [t if (done + j) % 5 != 4 else (t + 1) % V for j, t in enumerate(true)]
            ids = torch.tensor(s.draft_token_ids, dtype=torch.long)
            s.draft_probs = list(torch.nn.functional.one_hot(ids, V).float()) if self.one_hot_q \
                else [None] * len(s.draft_token_ids)
