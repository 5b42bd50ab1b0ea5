"""DSA decode past index_topk equals a dense reference restricted to the indexer's top-k.

The reference below is written from the equations (GLM-5's DSA, as in DeepSeek-V3.2), in float64, straight from
the checkpoint's tensors: MLA with keys and values expanded (not the engine's absorbed form), the lightning
indexer scored densely, and each query's attention masked to its top `index_topk` keys. It shares no code with
model/ or service/.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.engine_fixtures import greedy, make_checkpoint, make_engine, prompts, run_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of the last dim by pos * theta^(-2i/d) (GPT-J / interleaved)."""
    d = x.shape[-1]
    ang = pos[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [S, d/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def index_floor(n: int, latest_first: bool = True) -> torch.Tensor:
    """The indexer ReLU's floor per key position, as documented in model/indexer.py: (2^23 + p) * 2^-120; with
    `latest_first` False, the same values in reverse (a rule that prefers early keys)."""
    p = torch.arange(n, dtype=torch.float64)
    return ((2**23 + (p if latest_first else n - 1 - p)) * 2.0**-120)


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int], sparse: bool = True,
                     latest_first: bool = True) -> torch.Tensor:
    """Logits [S, V] of a whole sequence (each row sees its prefix only)."""
    W = {k: v.double() for k, v in sd.items()}
    S, nh, eps = len(ids), cfg["num_attention_heads"], cfg["rms_norm_eps"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ih, idim, topk = cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]
    theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    pos = torch.arange(S)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    x = W["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms(x, W[p + "input_layernorm.weight"], eps)
        # MLA, expanded: per-head keys [k_nope | shared rope key] and values from the latent.
        cq = rms(a @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], 1e-6)
        q = (cq @ W[p + "self_attn.q_b_proj.weight"].T).view(S, nh, dn + dr)
        kv = a @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        c, k_rope = kv[:, :-dr], rope_pairs(kv[:, -dr:], pos, theta)
        c = rms(c, W[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
        kvb = (c @ W[p + "self_attn.kv_b_proj.weight"].T).view(S, nh, dn + dv)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        q_nope, q_rope = q[..., :dn], rope_pairs(q[..., dn:], pos, theta)
        scores = (torch.einsum("thd,shd->hts", q_nope, k_nope) + torch.einsum("thd,sd->hts", q_rope, k_rope))
        scores = scores / math.sqrt(dn + dr)
        allowed = causal.clone()
        if sparse and S > topk:
            # Lightning indexer: I(t, s) = sum_j w_j(t) ReLU(u_j(t) . k(s) / sqrt(d)); keep the top-k keys.
            iq = (cq @ W[p + "self_attn.indexer.wq_b.weight"].T).view(S, ih, idim)
            iq = torch.cat([rope_pairs(iq[..., :dr], pos, theta), iq[..., dr:]], dim=-1)
            ik = F.layer_norm(a @ W[p + "self_attn.indexer.wk.weight"].T, (idim,),
                              W[p + "self_attn.indexer.k_norm.weight"], W[p + "self_attn.indexer.k_norm.bias"], 1e-6)
            ik = torch.cat([rope_pairs(ik[:, :dr], pos, theta), ik[:, dr:]], dim=-1)
            w = (a @ W[p + "self_attn.indexer.weights_proj.weight"].T) / math.sqrt(ih)
            # The ReLU's floor is a tiny per-key tie-breaker: keys a head scores 0 otherwise tie.
            dots = torch.einsum("thd,sd->ths", iq, ik) / math.sqrt(idim)
            index = torch.einsum("th,ths->ts", w, torch.maximum(dots, index_floor(S, latest_first)[None, None]))
            index = index.masked_fill(~causal, float("-inf"))
            chosen = torch.zeros_like(causal).scatter_(1, index.topk(topk, dim=-1).indices, True)
            allowed &= chosen
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("hts,shd->thd", probs, v).reshape(S, nh * dv)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        b = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        x = x + ffn(W, p + "mlp.", b, cfg, moe=layer >= cfg["first_k_dense_replace"])
    return rms(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


def swiglu(W: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def ffn(W: dict, p: str, x: torch.Tensor, cfg: dict, moe: bool) -> torch.Tensor:
    if not moe:
        return swiglu(W, p, x)
    # Sigmoid router; the correction bias picks experts but never weighs them.
    s = torch.sigmoid(x @ W[p + "gate.weight"].T)
    ids = (s + W[p + "gate.e_score_correction_bias"]).topk(cfg["num_experts_per_tok"], dim=-1).indices
    weights = s.gather(1, ids)
    weights = weights / weights.sum(-1, keepdim=True) * cfg["routed_scaling_factor"]
    out = swiglu(W, p + "shared_experts.", x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t], strict=True):
            out[t] += w * swiglu(W, f"{p}experts.{e}.", x[t : t + 1])[0]
    return out


def test_dsa_decode_matches_dense_reference_restricted_to_topk(engine_ckpt) -> None:
    cfg = json.loads((engine_ckpt / "config.json").read_text())
    sd = load_file(str(engine_ckpt / "model.safetensors"))
    prompt = prompts(1, [11], seed=5)[0]
    assert len(prompt) > cfg["index_topk"]
    engine = make_engine(engine_ckpt)
    engine.add_request("dsa", prompt, greedy(14, logprobs=3))
    choice = run_engine(engine)["dsa"][0]
    seq = prompt + choice.token_ids
    ref = torch.log_softmax(reference_logits(sd, cfg, seq), dim=-1)[len(prompt) - 1 : -1]
    dense = torch.log_softmax(reference_logits(sd, cfg, seq, sparse=False), dim=-1)[len(prompt) - 1 : -1]
    assert (ref - dense).abs().max() > 0.05, "top-k restriction never mattered: the test would prove nothing"
    for row, token, lp in zip(ref, choice.token_ids, choice.logprobs, strict=True):
        assert token == int(row.argmax())
        assert abs(lp.logprob - float(row[token])) < 1e-4
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - float(r)) for (_, v), r in zip(lp.top, top.values, strict=True)) < 1e-4
    # Decode reads min(index_topk, context) latents per query, out of the whole context.
    contexts = range(len(prompt) + 1, len(seq))
    stats = engine.stats()
    assert stats.dsa_tokens_read == sum(min(cfg["index_topk"], c) for c in contexts)
    assert stats.dsa_tokens_cached == sum(contexts)


def test_keys_an_indexer_scores_zero_are_chosen_by_position_in_every_path(tmp_path) -> None:
    """A ReLU'd indexer head scores every key on its dead side 0, and with few heads many keys tie at the k-th
    place: the choice among them must be a function of the scores (the documented floor), or decode, MTP verify
    and a chunked prefill read different keys and greedy speculative output parts from plain decoding. Here one
    indexer head with a zero query makes every key tie: each path must pick what the reference picks."""
    from safetensors.torch import save_file

    ckpt = make_checkpoint(tmp_path / "ckpt", index_n_heads=1)
    for f in ckpt.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if name.endswith("indexer.wq_b.weight"):
                t.zero_()
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    sd = load_file(str(ckpt / "model.safetensors"))
    prompt = prompts(1, [21], seed=11)[0]
    runs = {}
    for name, overrides in {"decode": {}, "mtp K=2": {"num_speculative_tokens": 2},
                            "chunked prefill": {"max_num_batched_tokens": 5}}.items():
        engine = make_engine(ckpt, **overrides)
        engine.add_request(name, prompt, greedy(12))
        runs[name] = run_engine(engine)[name][0].token_ids
    seq = prompt + runs["decode"]
    ref = reference_logits(sd, cfg, seq)[len(prompt) - 1 : -1]
    early = reference_logits(sd, cfg, seq, latest_first=False)[len(prompt) - 1 : -1]
    assert (ref - early).abs().max() > 0.05, "the tie-breaking rule never mattered: the test would prove nothing"
    assert runs["decode"] == ref.argmax(-1).tolist()
    assert runs["mtp K=2"] == runs["decode"]
    assert runs["chunked prefill"] == runs["decode"]


def test_the_floor_is_tiny_strictly_rising_and_serves_training_after_inference(monkeypatch) -> None:
    import model.indexer as indexer

    monkeypatch.setattr(indexer, "_floors", {})
    with torch.inference_mode():  # the engine makes it first
        floor = indexer.relu_floor(5000, torch.device("cpu"))
    assert torch.equal(floor.double(), index_floor(5000))
    assert bool((floor[1:] > floor[:-1]).all()) and float(floor.max()) < 2.0**-96
    x = torch.zeros(5000, requires_grad=True)
    torch.maximum(x, indexer.relu_floor(5000, torch.device("cpu"))).sum().backward()  # no inference tensor
    with pytest.raises(ValueError):
        indexer.relu_floor(indexer.MAX_FLOOR_POSITIONS + 1, torch.device("cpu"))
