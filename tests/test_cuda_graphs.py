"""CUDA graphs for decode and verify steps (service/engine/cuda_graphs.py), through the code path a GPU takes: on
the CPU the runner pads and refills each bucket's static inputs exactly as for a graph, then runs the forward on
them eagerly ("emulate"); only the capture itself needs a GPU (bench/gpu.sh checks it there)."""

from __future__ import annotations

import pytest

from model.batch import ForwardBatch
from service.engine.cuda_graphs import GraphRunner, next_pow2
from service.engine.sampling_params import SamplingParams
from service.engine.step_inputs import StepInputs
from tests.engine_fixtures import make_engine, prompts, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = prompts(5, [3, 7, 12, 20, 30])  # contexts from under index_topk (8) to well past it


def generate(engine, max_tokens: int = 24) -> list[list[int]]:
    """The batch of PROMPTS, then one short prompt alone (its contexts stay within index_topk: dense)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    out = run_engine(engine)
    engine.add_request("short", [5, 6], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    short = run_engine(engine)["short"][0].token_ids
    return [out[str(i)][0].token_ids for i in range(len(PROMPTS))] + [short]


@pytest.fixture
def emulated(monkeypatch):
    import service.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "graph_mode", lambda config, device: "emulate")


@pytest.mark.parametrize("k", [0, 2])
def test_graph_steps_give_the_eager_tokens(engine_ckpt, emulated, monkeypatch, k):
    """Greedy tokens with every uniform step through a padded bucket equal eager decoding; decodes (Q = 1) and
    verify steps (Q = K + 1) both take buckets, padded in batch (5 sequences: 8 rows) and in keys, dense and
    sparse."""
    import service.engine.engine as engine_mod

    engine = make_engine(engine_ckpt, num_speculative_tokens=k, max_num_seqs=8)
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.capture
    got = generate(engine)
    monkeypatch.setattr(engine_mod, "graph_mode", lambda config, device: None)
    eager_engine = make_engine(engine_ckpt, num_speculative_tokens=k, max_num_seqs=8)
    assert eager_engine.runner.graphs is None
    assert got == generate(eager_engine)
    assert graphs.replays > 0 and all(b.checked and not b.broken for b in graphs.buckets.values())
    keys = set(graphs.buckets)
    assert 8 in {B for B, _, _ in keys}  # 5 running sequences, padded with idle rows
    assert any(T <= 8 for _, _, T in keys) and any(T > 8 for _, _, T in keys)  # dense and DSA-sparse buckets
    if k:
        assert k + 1 in {Q for _, Q, _ in keys}
        # The MTP layer's draft steps took graphs of their own: one row per sequence, each bucket checked.
        drafts = engine.proposer.graphs
        assert drafts is not None and drafts.mtp and drafts.replays > 0
        assert {Q for _, Q, _ in drafts.buckets} == {1} and all(b.checked and not b.broken
                                                                for b in drafts.buckets.values())
    else:
        assert engine.runner.draft_graphs is None


def test_the_scratch_block_is_outside_the_block_managers_reach(engine_ckpt, emulated):
    engine = make_engine(engine_ckpt, max_num_seqs=4)
    graphs = engine.runner.graphs
    assert engine.runner.cache.num_blocks == engine.block_manager.num_blocks + 1
    assert graphs.scratch == engine.block_manager.num_blocks


def test_buckets_keep_contexts_the_indexer_leaves_dense_dense(engine_ckpt, emulated):
    """Key sizes are powers of two, plus index_topk itself, so a context the eager indexer skips (at most
    index_topk keys) never lands in a bucket where it would select; batches round up to powers of two; prefill
    chunks and mixed batches, longer contexts and bigger batches than the graphs cover run eagerly."""
    engine = make_engine(engine_ckpt, max_num_seqs=6)
    g: GraphRunner = engine.runner.graphs
    topk = engine.model_config.index_topk
    assert topk in g.key_sizes and g.key_sizes[-1] == g.max_keys
    assert [next_pow2(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]

    def batch(q: list[int], ctx: list[int]) -> StepInputs:
        import torch

        n = sum(q)
        return StepInputs(torch.zeros(n, dtype=torch.long), q, ctx, torch.zeros(len(q), 64, dtype=torch.long),
                          torch.zeros(n, dtype=torch.long))

    assert g.bucket_of(batch([1, 1, 1], [5, topk, 3])) == (4, 1, topk)
    assert g.bucket_of(batch([3, 3], [topk + 1, 20])) == (2, 3, 32)
    assert g.bucket_of(batch([5, 1], [5, 9])) is None  # a prefill chunk beside a decode
    assert g.bucket_of(batch([1] * 9, [4] * 9)) is None  # more rows than max_num_seqs' power of two
    assert g.bucket_of(batch([1], [g.max_keys + 1])) is None


def test_a_bucket_that_disagrees_with_eager_on_its_first_step_runs_eagerly(engine_ckpt, emulated, monkeypatch,
                                                                           caplog):
    """A graph that replays stale inputs (here: refills that never happen) is caught on its bucket's first step,
    which also runs eagerly; the bucket stays eager, with a warning, and the tokens are the eager ones."""
    import service.engine.engine as engine_mod

    monkeypatch.setattr(ForwardBatch, "refill", lambda self, other: None)
    engine = make_engine(engine_ckpt, max_num_seqs=8)
    with caplog.at_level("WARNING", logger="glm_serve.engine"):
        got = generate(engine)
    graphs = engine.runner.graphs
    # Every bucket but one: the short prompt's 2-token prefill (bucket (1, 2, 4)) sits at positions 0 and 1 of a
    # fresh context, which is what the stale idle rows hold, so its graph is right by coincidence.
    assert {k for k, b in graphs.buckets.items() if not b.broken} == {(1, 2, 4)} and len(graphs.buckets) > 3
    assert graphs.replays == 1 and "disagrees with the eager forward" in caplog.text  # that one prefill
    monkeypatch.setattr(engine_mod, "graph_mode", lambda config, device: None)
    assert got == generate(make_engine(engine_ckpt, max_num_seqs=8))


def test_graphs_only_on_cuda_without_enforce_eager_or_tensor_parallelism(engine_ckpt):
    import torch

    from service.engine.config import EngineConfig
    from service.engine.model_runner import graph_mode

    cfg = EngineConfig(model=engine_ckpt)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_mode(cfg, cuda) == "capture" and graph_mode(cfg, cpu) is None
    assert graph_mode(EngineConfig(model=engine_ckpt, enforce_eager=True), cuda) is None
    assert graph_mode(EngineConfig(model=engine_ckpt, tensor_parallel_size=2), cuda) is None
    assert make_engine(engine_ckpt).runner.graphs is None  # the CPU: eager, and no scratch block


def test_a_draft_bucket_with_stale_hidden_inputs_runs_eagerly(engine_ckpt, emulated, monkeypatch, caplog):
    """The MTP step's second static input (the state each draft continues) is checked like the ids: a bucket whose
    forward reads a stale one (here: zeros, as a graph would that never saw the refill) is caught on its first
    step and stays eager, with a warning, and the tokens are the eager ones."""
    import torch

    import service.engine.engine as engine_mod

    engine = make_engine(engine_ckpt, num_speculative_tokens=2, max_num_seqs=8)
    drafts = engine.proposer.graphs
    real = drafts._forward

    def stale(ids, hidden, fb):
        if any(hidden is b.hidden for b in drafts.buckets.values()):
            hidden = torch.zeros_like(hidden)
        return real(ids, hidden, fb)

    monkeypatch.setattr(drafts, "_forward", stale)
    with caplog.at_level("WARNING", logger="glm_serve.engine"):
        got = generate(engine)
    assert drafts.buckets and all(b.broken for b in drafts.buckets.values()) and drafts.replays == 0
    assert "disagrees with the eager forward" in caplog.text
    monkeypatch.setattr(engine_mod, "graph_mode", lambda config, device: None)
    assert got == generate(make_engine(engine_ckpt, num_speculative_tokens=2, max_num_seqs=8))
