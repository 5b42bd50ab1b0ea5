"""The trainer: the indexer KL loss, the MTP target shift, the stage switch, and a smoke run that learns."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model.batch import ForwardBatch
from model.config import ModelConfig
from model.indexer import Indexer
from model.network import GlmMoeDsaForCausalLM
from model.train import (
    TrainArgs,
    call_weights,
    default_config,
    indexer_kl,
    init_weights,
    losses,
    set_sparse,
    stage_of,
    system_turn_weights,
    train,
)

TINY = {**default_config(64, 1, [0], 0), "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 2, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2,
        "num_attention_heads": 2, "initializer_range": 0.1}


def tiny_model(seed: int = 0) -> GlmMoeDsaForCausalLM:
    model = GlmMoeDsaForCausalLM(ModelConfig.from_dict(TINY))
    init_weights(model, 0.1, seed)
    return model


def test_indexer_kl_is_zero_when_distributions_agree_and_positive_otherwise():
    p = torch.tensor([[[0.7, 0.2, 0.1]]])  # [B=1, Q=1, T=3]
    attn = p[:, None].expand(1, 2, 1, 3) / 2  # two heads, each half the mass
    same = {"attn": attn, "index": torch.log(p), "topk": None}
    assert indexer_kl([same], sparse=False).item() == pytest.approx(0.0, abs=1e-6)
    flat = {"attn": attn, "index": torch.zeros(1, 1, 3), "topk": None}
    expected = (p * (p.log() - torch.log(torch.full_like(p, 1 / 3)))).sum()
    assert indexer_kl([flat], sparse=False).item() == pytest.approx(expected.item(), rel=1e-5)
    # Sparse: both distributions restricted to the selected keys {0, 1}.
    sel = {"attn": attn, "index": torch.zeros(1, 1, 3), "topk": torch.tensor([[[0, 1]]])}
    p2 = torch.tensor([0.7, 0.2]) / 0.9
    expected2 = (p2 * (p2.log() - torch.log(torch.tensor(0.5)))).sum()
    assert indexer_kl([sel], sparse=True).item() == pytest.approx(expected2.item(), rel=1e-5)
    # Masked (future) keys carry no mass and no loss.
    masked = {"attn": attn, "index": torch.tensor([[[0.0, 0.0, float("-inf")]]]), "topk": None}
    assert torch.isfinite(indexer_kl([masked], sparse=False))


def test_mtp_loss_targets_the_token_after_next():
    """The MTP logits at position i must be scored against t_{i+2}: compare with a hand-computed loss."""
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = losses(model, tokens, "dense", 0.3)
    B, S = 2, 8
    x = tokens[:, :-1]
    h = model(x.reshape(-1), ForwardBatch(torch.arange(S).repeat(B), [S] * B, [S] * B)).view(B, S, -1)
    z = model.mtp(x[:, 1:].reshape(-1), h[:, :-1].reshape(-1, h.shape[-1]),
                  ForwardBatch(torch.arange(S - 1).repeat(B), [S - 1] * B, [S - 1] * B))
    logits = model.mtp_logits(z).view(B, S - 1, -1)
    want = F.cross_entropy(logits[:, : S - 2].reshape(-1, 64), tokens[:, 2:S].reshape(-1))
    assert out["mtp"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx((out["lm"] + 0.3 * out["mtp"]).item(), rel=1e-5)


def test_mtp_distillation_pulls_the_draft_towards_the_main_models_next_prediction():
    """With `mtp_distill`, MTP row i also learns KL(main model's row i+1 || draft row i): both predict t_{i+2}.
    Checked by hand, with system-turn rows (weight 0) skipped on both sides."""
    model = tiny_model()
    B, S = 2, 10
    tokens = torch.randint(0, 64, (B, S + 1), generator=torch.Generator().manual_seed(3))
    weights = torch.ones(B, S)
    weights[0, 2:5] = 0.0
    out = losses(model, tokens, "dense", 0.3, weights=weights, mtp_distill=0.25)
    x = tokens[:, :-1]
    h = model(x.reshape(-1), ForwardBatch(torch.arange(S).repeat(B), [S] * B, [S] * B)).view(B, S, -1)
    z = model.mtp(x[:, 1:].reshape(-1), h[:, :-1].reshape(-1, h.shape[-1]),
                  ForwardBatch(torch.arange(S - 1).repeat(B), [S - 1] * B, [S - 1] * B)).view(B, S - 1, -1)
    kls, ces = [], []
    for b in range(B):
        for i in range(S - 2):
            if weights[b, i + 1] == 0:
                continue
            draft = F.log_softmax(model.mtp_logits(z[b, i]), -1)
            main = F.log_softmax(model.logits(h[b, i + 1]), -1)
            kls.append((main.exp() * (main - draft)).sum())
            ces.append(-draft[tokens[b, i + 2]])
    assert len(kls) == B * (S - 2) - 3
    assert out["mtp_kl"].item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)
    assert out["mtp"].item() == pytest.approx(torch.stack(ces).mean().item(), rel=1e-5)
    mixed = 0.75 * out["mtp"] + 0.25 * out["mtp_kl"]
    assert out["total"].item() == pytest.approx((out["lm"] + 0.3 * mixed).item(), rel=1e-5)


def test_stage_switch_and_which_parameters_learn():
    a = TrainArgs(steps=100, dense_frac=0.6, indexer_warmup_frac=0.1)
    assert [stage_of(s, a) for s in (0, 59, 60, 69, 70, 99)] == ["dense", "dense", "warmup", "warmup", "sparse",
                                                                "sparse"]
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))  # 12 > index_topk
    for stage in ("dense", "warmup", "sparse"):
        set_sparse(model, stage == "sparse")
        model.zero_grad()
        losses(model, tokens, stage, 0.3)["total"].backward()
        idx_grad = any(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in model.named_parameters() if ".indexer." in n)
        main_grad = any(p.grad is not None and p.grad.abs().sum() > 0
                        for n, p in model.named_parameters() if ".indexer." not in n)
        assert (idx_grad, main_grad) == {"dense": (False, True), "warmup": (True, False),
                                         "sparse": (True, True)}[stage]
    set_sparse(model, True)
    assert all(m.topk == TINY["index_topk"] for m in model.modules() if isinstance(m, Indexer))


def tiny_run(tmp_path, **kw) -> TrainArgs:
    """A tiny corpus, tokenizer and config under tmp_path, and the arguments of a short run on them."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 40
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "heldout"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=64, special_tokens=["<|endoftext|>", "[gMASK]"]))
    tdir = tmp_path / "tok"
    tdir.mkdir()
    tok.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "chat_template": "{{ messages[0]['content'] }}"}))
    cfg = {**TINY, "vocab_size": tok.get_vocab_size()}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    base = dict(data=str(data), tokenizer=str(tdir), out=str(tmp_path / "run"), export=str(tmp_path / "exp"),
                steps=30, batch=4, seq_len=16, lr=3e-3, dense_frac=0.6, indexer_warmup_frac=0.2, autocast="off",
                config_json=str(tmp_path / "cfg.json"), save_every=10)
    return TrainArgs(**{**base, **kw})


def test_smoke_training_lowers_the_loss_and_exports(tmp_path):
    from model.loader import load_model

    args = tiny_run(tmp_path)
    report = train(args)
    log = json.loads((tmp_path / "run" / "report.json").read_text())
    assert log["heldout"]["lm_loss"] < 3.0  # ln(vocab) ~ 4.1 at the start
    assert 0.0 <= report["recall_final"] <= 1.0
    model = load_model(tmp_path / "exp")
    assert model.has_mtp and (tmp_path / "exp" / "tokenizer.json").exists()
    # Resuming a finished run changes nothing and reloads the same weights.
    again = train(TrainArgs(**{**args.__dict__, "resume": True, "export": None}))
    assert again["heldout"] == report["heldout"]


class Restarted(Exception):
    pass


def test_a_run_restarted_at_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    """`main` re-executes an aged trainer after a checkpoint; the resumed process must continue the same run:
    same batches, optimizer state, expert bias and precision, so the same final weights."""
    straight = tiny_run(tmp_path, steps=12, save_every=4, export=None)
    train(straight)

    def stop(step: int) -> None:
        raise Restarted(step)

    cut = TrainArgs(**{**straight.__dict__, "out": str(tmp_path / "cut")})
    with pytest.raises(Restarted, match="^4$"):
        train(cut, after_save=stop)
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["step"] == 4
    train(TrainArgs(**{**cut.__dict__, "resume": True}))
    want = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["model"]
    got = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["model"]
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_main_re_executes_itself_with_resume_once_the_process_is_old(tmp_path, monkeypatch):
    import sys

    import model.train as train_module

    args = tiny_run(tmp_path, steps=12, save_every=4, export=None)
    calls = []

    def fake_execv(path, argv):
        calls.append((path, argv))
        raise Restarted

    monkeypatch.setattr(train_module.os, "execv", fake_execv)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.__dict__.items()
            if v is not None and not isinstance(v, bool) and k != "restart_minutes"]
    with pytest.raises(Restarted):
        train_module.main([*argv, "--restart-minutes=1e-9"])
    assert calls == [(sys.executable, [sys.executable, "-m", "model.train", *argv, "--restart-minutes=1e-9",
                                       "--resume"])]
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["step"] == 4
    assert train_module.main([*argv, "--restart-minutes=0", "--resume"]) == 0  # 0: never restarts
    assert len(calls) == 1
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["step"] == 12


def test_windows_start_at_conversation_starts_or_code_strides(tmp_path):
    from model.train_data import CODE_STRIDE, TokenStream

    class CharTok:  # one id per character: offsets are easy to check
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    docs = [{"text": "c" * (CODE_STRIDE * 2 + 5), "kind": "code"}, {"text": "T" * 40, "kind": "tool"},
            {"text": "h" * 30, "kind": "chat"}, {"text": "n" * 20, "kind": "no_tool"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    stream = TokenStream.from_jsonl(path, CharTok(), tmp_path / "cache.pt")
    n_code = CODE_STRIDE * 2 + 5
    assert stream.anchors.tolist() == [0, CODE_STRIDE, 2 * CODE_STRIDE, n_code, n_code + 40, n_code + 70]
    cached = TokenStream.from_jsonl(path, CharTok(), tmp_path / "cache.pt")
    assert torch.equal(cached.tokens, stream.tokens) and torch.equal(cached.anchors, stream.anchors)
    for step in range(20):
        batch = stream.batch(4, 16, seed=0, step=step)
        assert torch.equal(batch, stream.batch(4, 16, seed=0, step=step))  # a resumed run sees the same windows
        for row in batch.tolist():
            first = chr(row[0])
            # a conversation window starts at its first character; the last one is clamped into the stream
            assert first in "cThn" and (first != "T" or row.count(ord("T")) == 16)
    assert stream.batch(64, 16, 0, 0).shape == (64, 16)


def test_call_weights_cover_each_call_from_its_open_to_its_close_tag():
    OPEN, CLOSE = 1, 2
    tokens = torch.tensor([[5, OPEN, 7, 8, CLOSE, 5, OPEN, 9, CLOSE, 4]])
    w = call_weights(tokens, OPEN, CLOSE, 3.0)  # weights of the targets tokens[:, 1:]
    assert w.tolist() == [[3.0, 3.0, 3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 1.0]]
    model = tiny_model()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ones = losses(model, x, "dense", 0.3, weights=torch.ones(2, 9))["lm"]
    assert ones.item() == pytest.approx(losses(model, x, "dense", 0.3)["lm"].item(), rel=1e-5)


def test_system_turns_can_leave_the_loss_and_their_rows_the_heads():
    SYS, USER, ASSIST = 1, 2, 3
    tokens = torch.tensor([[9, SYS, 5, 6, USER, 7, ASSIST, 8, SYS, 5, ASSIST, 4]])
    w = system_turn_weights(tokens, SYS, [USER, ASSIST], 0.0)  # weights of the targets tokens[:, 1:]
    assert w.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    # Zero-weight rows leave the loss exactly as if they had been computed and multiplied by 0, for the LM and
    # the MTP losses both (the MTP target t_{i+2} counts when the LM target t_{i+1}... is weighted: w[:, i+1]).
    model = tiny_model()
    x = torch.randint(5, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    x[:, 1], x[:, 6] = SYS, USER
    w = system_turn_weights(x, SYS, [USER], 0.0)
    got = losses(model, x, "dense", 0.3, weights=w)
    per_token = F.cross_entropy(model.logits(model(x[:, :-1].reshape(-1), ForwardBatch(
        torch.arange(11).repeat(2), [11] * 2, [11] * 2))), x[:, 1:].reshape(-1), reduction="none")
    want = (per_token * w.reshape(-1)).sum() / w.sum()
    assert got["lm"].item() == pytest.approx(want.item(), rel=1e-5)
    everything = losses(model, x, "dense", 0.3)
    assert got["lm"].item() != pytest.approx(everything["lm"].item(), rel=1e-3)
    assert got["mtp"].item() != pytest.approx(everything["mtp"].item(), rel=1e-3)
    ones = losses(model, x, "dense", 0.3, weights=torch.ones(2, 11))
    assert ones["mtp"].item() == pytest.approx(everything["mtp"].item(), rel=1e-5)


def test_budget_steps_fit_the_minutes_left_with_a_margin_and_stay_in_bounds():
    from model.train import BUDGET_MARGIN, budget_steps

    a = TrainArgs(steps=10_000, time_budget_minutes=10.0)
    # 40 steps done in 20 s, 0.1 s a step: (600 * margin - 20) / 0.1 more
    assert budget_steps(a, 40, 0.1, 20.0) == 40 + int((600 * BUDGET_MARGIN - 20) / 0.1)
    assert budget_steps(a, 40, 1e-6, 20.0) == 10_000  # never more than --steps
    assert budget_steps(a, 40, 0.1, 10_000.0) == 41  # over budget already: the next step ends it


def test_a_time_budget_shortens_the_run_and_a_resume_keeps_its_steps(tmp_path, monkeypatch):
    import model.train as train_module

    monkeypatch.setattr(train_module, "BUDGET_WARMUP_STEPS", 1)
    monkeypatch.setattr(train_module, "BUDGET_PROBE_STEPS", 2)
    monkeypatch.setattr(train_module, "budget_steps", lambda a, step, per_step, elapsed: 9)
    args = tiny_run(tmp_path, steps=1000, time_budget_minutes=1.0, export=None, moe_impl="loop")
    report = train(args)
    assert report["budget_steps"] == 9
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert state["step"] == 9 and len(state["log"]) == 9
    again = train(TrainArgs(**{**args.__dict__, "steps": 1000, "resume": True}))  # the budget is not re-measured
    assert again["budget_steps"] == 9 and again["heldout"] == report["heldout"]


def test_export_only_writes_the_last_checkpoint_of_a_run_cut_short(tmp_path):
    from model.loader import load_model
    from model.train import main

    args = tiny_run(tmp_path, steps=8, save_every=4, export=None)
    train(args)
    argv = ["--data", args.data, "--tokenizer", args.tokenizer, "--out", args.out, "--config-json", args.config_json,
            "--export", str(tmp_path / "cut"), "--export-only"]
    assert main(argv) == 0
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["model"]
    got = load_model(tmp_path / "cut").state_dict()
    assert torch.allclose(got["lm_head.weight"], state["lm_head.weight"].to(torch.bfloat16).float())


def test_the_indexer_trains_on_long_batches_that_inference_would_tile(monkeypatch):
    """A batch past ALL_HEADS_MAX_ELEMENTS takes the tiled scorer at inference, whose reused buffers autograd
    cannot follow (batch 64 x 512 on a GPU hit it): with gradients on, the indexer's loss must still backpropagate,
    to the same gradients."""
    from model import indexer as indexer_module

    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))

    def grads() -> dict[str, torch.Tensor]:
        model = tiny_model()
        losses(model, tokens, "warmup", 0.0)["total"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".indexer." in n and p.grad is not None}

    want = grads()
    monkeypatch.setattr(indexer_module, "ALL_HEADS_MAX_ELEMENTS", 0)
    got = grads()
    assert want and want.keys() == got.keys()
    assert all(torch.allclose(want[n], got[n]) for n in want)
