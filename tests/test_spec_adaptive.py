"""Drafting that switches on and off mid-request stays lossless: greedy tokens equal plain decoding whatever the
depth script (under preemption, with prefix caching, beside grammar-constrained and seeded sampled rows); the MTP
entries written late (deferred while the depth is 0) equal those an always-drafting engine writes; and the
default configuration drafts adaptively."""

from __future__ import annotations

import pytest
import torch

from service.engine import engine as engine_mod
from service.engine.block_manager import BlockManager
from service.engine.sampling_params import SamplingParams
from service.engine.spec_policy import AdaptivePolicy
from service.engine.speculative import MTPProposer
from tests import engine_fixtures
from tests.engine_fixtures import assert_no_leaks, greedy, make_engine, prompts, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 24  # past DEFER_ROWS, so a deferred catch-up also flushes by size
DEFER_ROWS = 16
PROMPTS = prompts(6, [3, 9, 17, 30, 5, 12], seed=4)  # index_topk is 8


@pytest.fixture(autouse=True)
def short_deferral(monkeypatch):
    """Flush deferred MTP rows after 16 (the default is 32): short requests reach a flush by size."""
    monkeypatch.setattr(MTPProposer, "defer_rows", DEFER_ROWS)


class Scripted(AdaptivePolicy):
    """Depths from a script, cycled; an AdaptivePolicy, so rows are eligible exactly as under the default."""

    def __init__(self, max_depth: int, script: list[int]) -> None:
        super().__init__(max_depth)
        self.script, self.calls = script, 0

    def depth(self, batch_size: int) -> int:
        self.calls += 1
        return self.script[(self.calls - 1) % len(self.script)]


def scripted_engine(ckpt, script: list[int], k: int = 3, **kw):
    engine = make_engine(ckpt, num_speculative_tokens=k, **kw)
    engine.spec.policy = Scripted(k, script)
    return engine


def run(engine, params=None) -> list[list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params or greedy(MAX_TOKENS))
    res = run_engine(engine)
    assert_no_leaks(engine)
    return [res[str(i)][0].token_ids for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def plain(engine_ckpt) -> list[list[int]]:
    return run(make_engine(engine_ckpt))


class OracleDrafts(engine_fixtures.OracleDrafts):
    one_hot_q = False  # greedy drafts


SCRIPTS = {"mixed": [0, 0, 3, 0, 1, 2, 0, 0, 0, 2], "long-off": [3] * 3 + [0] * 20, "alternate": [1, 0]}


@pytest.mark.parametrize("cache_tokens", [4096, 80])  # 80 tokens cannot hold 6 sequences: preemption
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_switching_depth_mid_request_keeps_greedy_tokens(engine_ckpt, plain, monkeypatch, script, cache_tokens):
    OracleDrafts.truth = {str(i): t for i, t in enumerate(plain)}
    monkeypatch.setattr(engine_mod, "MTPProposer", OracleDrafts)
    engine = scripted_engine(engine_ckpt, SCRIPTS[script], kv_cache_tokens=cache_tokens)
    assert run(engine) == plain
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens > 0 and stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert engine.spec.depth_steps[0] > 0 and sum(engine.spec.depth_steps[1:]) > 0
    if cache_tokens == 80:
        assert stats.num_preemptions > 0


class DropsDeferred(MTPProposer):
    """A broken proposer: the rows deferred while not drafting are lost, so their MTP entries are never written."""

    def propose(self, done, hidden, max_model_len, depth=None):
        if depth:
            for seq, _, _ in done:
                seq.mtp_hidden = []
        return super().propose(done, hidden, max_model_len, depth)


def test_deferred_mtp_entries_equal_always_drafting(engine_ckpt, plain, draft_inputs, monkeypatch):
    script = [2] + [0] * 18 + [2, 0, 0, 2, 0, 2]  # a flush by size (DEFER_ROWS), then flushes on resuming
    always = make_engine(engine_ckpt, num_speculative_tokens=2)
    assert run(always) == plain
    switching = scripted_engine(engine_ckpt, script, k=2)
    assert run(switching) == plain
    ref, got = draft_inputs[id(always.proposer)], draft_inputs[id(switching.proposer)]
    assert len(got) >= len(PROMPTS) * 2 and got.keys() <= ref.keys()
    assert max((got[key] - ref[key]).abs().max().item() for key in got) < 1e-4

    monkeypatch.setattr(engine_mod, "MTPProposer", DropsDeferred)
    broken = scripted_engine(engine_ckpt, script, k=2)
    assert run(broken) == plain  # still lossless (verification), but the drafts read stale entries
    bad = draft_inputs[id(broken.proposer)]
    assert max((bad[key] - ref[key]).abs().max().item() for key in bad) > 1e-3


def test_a_k_drafts_adaptively_by_default(engine_ckpt, plain):
    from service.engine.config import EngineConfig

    # On by default: adaptive, up to 3 drafts (bench/README.md, "Adaptive depth up to 3": the A/B on the shipped model)
    assert (EngineConfig.num_speculative_tokens, EngineConfig.speculative_policy) == (3, "adaptive")
    engine = make_engine(engine_ckpt, num_speculative_tokens=EngineConfig.num_speculative_tokens,
                         speculative_policy=EngineConfig.speculative_policy)
    assert isinstance(engine.spec.policy, AdaptivePolicy) and engine.num_speculative_tokens == 3
    assert run(engine) == plain
    assert engine.stats().spec_num_drafts > 0  # it measured depth 0 first, then climbed
    assert make_engine(engine_ckpt, num_speculative_tokens=0).spec is None
    with pytest.raises(ValueError, match="adaptive or fixed"):
        make_engine(engine_ckpt, num_speculative_tokens=0, speculative_policy="greedy")


def test_deferred_entries_reach_the_prefix_cache(engine_ckpt, monkeypatch):
    """A request that drafted nothing still leaves valid MTP entries in the blocks it cached (written by the
    deferred catch-up after the blocks were offered), so the next turn, drafting, reuses them."""
    prompt = PROMPTS[1]  # 9 tokens: the prefill itself is deferred
    g = greedy(MAX_TOKENS)

    def turns(engine) -> tuple[list[int], list[int], int]:
        engine.spec.policy = Scripted(2, [0])
        engine.add_request("first", prompt, g)
        first = run_engine(engine)["first"][0].token_ids
        engine.spec.policy = Scripted(2, [2])
        engine.add_request("next", prompt + first, g)
        cached = 0
        nxt: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                cached = out.num_cached_tokens
                nxt += out.outputs[0].token_ids
        assert_no_leaks(engine)
        return first, nxt, cached

    want_first = run_engine_one(make_engine(engine_ckpt), prompt, g)
    want_next = run_engine_one(make_engine(engine_ckpt), prompt + want_first, g)
    first, nxt, cached = turns(make_engine(engine_ckpt, num_speculative_tokens=2))
    assert (first, nxt) == (want_first, want_next)
    assert cached == DEFER_ROWS  # positions 0-15 flushed by size; 16 on were still deferred when "first" ended
    monkeypatch.setattr(BlockManager, "mtp_written", lambda self, seq, first: None)
    assert turns(make_engine(engine_ckpt, num_speculative_tokens=2))[2] == 0


def run_engine_one(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("r", prompt, params)
    return run_engine(engine)["r"][0].token_ids


def test_constrained_and_seeded_rows_beside_switching_drafts(engine_ckpt, plain):
    """Grammar rows draft nothing and stay valid; a seeded sampled row drafts nothing under the adaptive policy,
    so its tokens equal the same request alone without speculation; free greedy rows equal plain decoding."""
    from service.api import structured

    spec = structured.build_spec({"type": "or", "elements": [{"type": "const_string", "value": v}
                                                             for v in ("hello world", "hello engine")]}, False)
    seeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True)
    engine = scripted_engine(engine_ckpt, [0, 2, 3, 0, 1], enable_prefix_caching=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    engine.add_request("choice", PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0, structured=spec))
    engine.add_request("seeded", PROMPTS[2], seeded)
    out = run_engine(engine)
    assert_no_leaks(engine)
    assert [out[str(i)][0].token_ids for i in range(len(PROMPTS))] == plain
    assert out["choice"][0].text in ("hello world", "hello engine") and out["choice"][0].finish_reason == "stop"
    assert out["seeded"][0].token_ids == run_engine_one(make_engine(engine_ckpt), PROMPTS[2], seeded)
    assert engine.stats().spec_num_drafts > 0
    assert torch.get_num_threads() == 1


def test_fill_cache_writes_what_the_full_mtp_layer_writes(engine_ckpt):
    """mtp_fill_cache (the catch-up of positions nobody drafts from) writes the MTP layer's latent and indexer
    key exactly as the full layer does, and nothing of the main layers."""
    from model.batch import ForwardBatch
    from model.kv_cache import KVCache, Store
    from model.loader import load_model

    model = load_model(engine_ckpt, torch.float32)
    cfg = model.config
    n = 30  # past index_topk
    ids = torch.tensor(PROMPTS[3][:n])
    hidden = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    caches = [KVCache(cfg, 16, 4, torch.float32, torch.device("cpu")) for _ in range(2)]
    with torch.inference_mode():
        model.mtp(ids, hidden, ForwardBatch.single(n, cache=caches[0]))
        model.mtp_fill_cache(ids, hidden, ForwardBatch.single(n, cache=caches[1]))
    mtp_layer = cfg.num_hidden_layers
    slots = torch.arange(n)
    stores = [Store.LATENT] + ([Store.INDEX_KEY] if cfg.use_indexer else [])
    for store in stores:
        full, filled = (c.read(store, mtp_layer, slots) for c in caches)
        assert full.abs().sum() > 0 and torch.allclose(full, filled, atol=1e-6), store
    assert caches[1].read(Store.LATENT, 0, slots).abs().sum() == 0  # the main layers' entries stay untouched


def test_fused_catch_up_drafts_from_what_write_then_draft_computes(engine_ckpt, monkeypatch, plain):
    """A drafting sequence's few new positions go through the whole MTP layer with its last one (`fuse_rows`):
    the first draft's input equals that of writing those entries first and running the layer on the last
    position alone, so every step drafts the same tokens, and output stays plain decoding's."""
    inputs: dict[int, list[torch.Tensor]] = {}
    draft = MTPProposer._draft

    def recording(self, seqs, z, max_model_len):
        inputs[self.fuse_rows].append(z.clone())
        return draft(self, seqs, z, max_model_len)

    monkeypatch.setattr(MTPProposer, "_draft", recording)
    default = MTPProposer.fuse_rows
    for fuse in (default, 0):
        monkeypatch.setattr(MTPProposer, "fuse_rows", fuse)
        inputs[fuse] = []
        assert run(scripted_engine(engine_ckpt, [3], max_num_seqs=1)) == plain  # at most 3 rows before the last
    fused, apart = inputs[default], inputs[0]
    assert default >= 4 and len(fused) == len(apart) > 10
    for a, b in zip(fused, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_default_draft_depth_is_ignored_by_a_checkpoint_without_an_mtp_layer(tmp_path):
    """Speculation is on by default, so every checkpoint meets it: one without MTP weights serves plainly."""
    from service.engine.config import EngineConfig
    from tests.engine_fixtures import make_checkpoint

    path = make_checkpoint(tmp_path / "no_mtp", mtp=False)
    engine = make_engine(path, num_speculative_tokens=EngineConfig.num_speculative_tokens,
                         speculative_policy=EngineConfig.speculative_policy)
    assert engine.spec is None and engine.num_speculative_tokens == 0
