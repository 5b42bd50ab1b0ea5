"""The MTP-only fine-tune (model/train_mtp.py): what its loss scores, which rows count, that it trains the MTP
layer alone and learns, that a cut run resumes to the same weights, and that --merge keeps every other tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import train_mtp
from model.batch import ForwardBatch
from model.loader import load_model
from model.tokenizer import Tokenizer
from tests.engine_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt", seed=3)


def tokens_dir(tmp_path, vocab: int, n: int = 4000):
    """Token caches for train and held-out: the same repetitive stream, so a few steps can learn it."""
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(1, vocab, (37,), generator=g, dtype=torch.int32)
    tokens = phrase.repeat(n // 37 + 1)[:n]
    for split in ("train", "heldout"):
        torch.save({"tokens": tokens, "anchors": torch.arange(0, n, 5)}, tmp_path / f"{split}_tokens.pt")
    return tmp_path


def test_the_draft_row_i_is_scored_against_the_main_models_row_i_plus_1(ckpt):
    model = load_model(ckpt).eval()
    B, S = 2, 9
    tokens = torch.randint(1, model.config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    keep = torch.rand(B, S - 1, generator=torch.Generator().manual_seed(2)) > 0.3
    got = train_mtp.mtp_losses(model, tokens, 0.25, keep)
    x = tokens[:, :-1]
    with torch.no_grad():
        h = model(x.reshape(-1), ForwardBatch(torch.arange(S).repeat(B), [S] * B, [S] * B)).view(B, S, -1)
        main = model.logits(h[:, 1:].reshape(-1, h.shape[-1])).view(B, S - 1, -1)[keep]
        z = model.mtp(x[:, 1:].reshape(-1), h[:, :-1].reshape(-1, h.shape[-1]),
                      ForwardBatch(torch.arange(S - 1).repeat(B), [S - 1] * B, [S - 1] * B))
        draft = model.mtp_logits(z).view(B, S - 1, -1)[keep]
    p, logq = F.softmax(main, -1), F.log_softmax(draft, -1)
    kl = (p * (p.log() - logq)).sum(-1).mean()
    ce = F.cross_entropy(draft, tokens[:, 2:][keep])
    assert got["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert got["ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert got["total"].item() == pytest.approx((0.75 * kl + 0.25 * ce).item(), rel=1e-4)
    assert got["agree"].item() == pytest.approx((draft.argmax(-1) == main.argmax(-1)).float().mean().item())


def test_draft_rows_leave_out_targets_inside_system_turns():
    class Tok:
        ids = {"<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3}

        def token_to_id(self, t: str) -> int | None:
            return self.ids.get(t)

    #                         0  1  2  3  4  5  6  7  8
    tokens = torch.tensor([[9, 1, 7, 7, 2, 8, 3, 8, 8]])  # S = 8: MTP rows 0..6 predict t_2..t_8
    rows = train_mtp.draft_rows(tokens, Tok())
    # t_1..t_3 lie in the system turn; t_4, the <|user|> marker, opens the next one
    assert rows.tolist() == [[False, False, True, True, True, True, True]]
    assert train_mtp.draft_rows(tokens, type("NoMarkers", (), {"token_to_id": lambda self, t: None})()) is None


def test_fine_tune_trains_the_mtp_layer_alone_learns_and_merges(ckpt, tmp_path):
    data = tokens_dir(tmp_path, 320)
    a = train_mtp.MTPArgs(model=str(ckpt), tokens=str(data), out=str(tmp_path / "run"), steps=40, batch=4,
                          seq_len=32, lr=3e-3, warmup=2, eval_sequences=4, device="cpu")
    report = train_mtp.train_mtp(a)
    assert report["after"]["kl"] < 0.5 * report["before"]["kl"]  # a repeated phrase: the draft learns it
    assert report["after"]["agree"] >= report["before"]["agree"]
    mtp = load_file(str(tmp_path / "run" / "mtp.safetensors"))
    before = load_file(str(ckpt / "model.safetensors"))
    L = load_model(ckpt).config.num_hidden_layers
    assert mtp and all(k.startswith(f"model.layers.{L}.") for k in mtp)
    assert any(not torch.equal(v, before[k]) for k, v in mtp.items())
    assert all(v.dtype == before[k].dtype for k, v in mtp.items())
    replaced = train_mtp.merge(ckpt, tmp_path / "run" / "mtp.safetensors", tmp_path / "merged")
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(after) == set(before) and replaced == sorted(mtp)
    for k in before:
        assert torch.equal(after[k], mtp[k] if k in mtp else before[k]), k
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "config.json").is_file()
    merged = load_model(tmp_path / "merged")  # loads, and drafts what the run measured (held-out: 4 x 33 tokens)
    held = torch.load(data / "heldout_tokens.pt")["tokens"][:4 * 33].long().view(4, 33)
    assert train_mtp.evaluate(merged, held, Tokenizer.from_dir(ckpt))["kl"] == pytest.approx(report["after"]["kl"],
                                                                                         rel=0.05)


def test_a_run_cut_after_a_checkpoint_resumes_to_the_same_weights(ckpt, tmp_path, monkeypatch):
    data = tokens_dir(tmp_path, 320)
    kw = dict(model=str(ckpt), tokens=str(data), steps=6, batch=2, seq_len=16, lr=1e-3, warmup=2,
              eval_sequences=2, device="cpu", save_seconds=0.0)
    train_mtp.train_mtp(train_mtp.MTPArgs(out=str(tmp_path / "whole"), **kw))
    calls = {"n": 0}
    real = train_mtp.balance_experts

    def cut(*args, **kwargs):  # called once a step, after the optimizer step: the 4th step dies unsaved
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mtp, "balance_experts", cut)
    with pytest.raises(KeyboardInterrupt):
        train_mtp.train_mtp(train_mtp.MTPArgs(out=str(tmp_path / "cut"), **kw))
    assert torch.load(tmp_path / "cut" / "mtp_state.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(train_mtp, "balance_experts", real)
    train_mtp.train_mtp(train_mtp.MTPArgs(out=str(tmp_path / "cut"), resume=True, **kw))
    whole, resumed = (load_file(str(tmp_path / d / "mtp.safetensors")) for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
