"""The bench scripts' plumbing: tables, JSON results, metric summaries, the closing target table, and real runs of
the in-process benchmarks on a tiny random checkpoint. No vLLM, no aiperf, no timing claims."""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import aiperf_client  # noqa: E402
import common  # noqa: E402
import loadgen  # noqa: E402
import run_all  # noqa: E402


def test_table_and_percentiles():
    rows = [{"a": 1, "b": 2.345, "c": None, "d": True}, {"a": 10, "b": 0.5, "c": "x", "d": False}]
    text = common.format_table("T", [("a", "A", "d"), ("b", "B", ".2fx"), ("c", "C", ""), ("d", "D", "")], rows)
    lines = text.splitlines()
    assert lines[0] == "T" and lines[1].split() == ["A", "B", "C", "D"]
    assert lines[2].split() == ["1", "2.35x", "-", "yes"] and lines[3].split() == ["10", "0.50x", "x", "no"]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned columns
    assert common.percentile([1, 2, 3, 4], 50) == 2.5 and common.percentile([5], 99) == 5
    assert common.percentile([], 50) is None
    assert common.ratio(3.0, 2.0) == 1.5 and common.ratio(None, 2.0) is None and common.ratio(1.0, 0) is None


def test_result_roundtrip(tmp_path):
    path = common.write_result("x", [{"v": 1, "p": Path("/a")}], {"threads": 2}, {"s": 3}, tmp_path)
    assert path == tmp_path / "x.json"
    data = common.read_result("x", tmp_path)
    assert data == {"name": "x", "meta": {"threads": 2}, "rows": [{"v": 1, "p": "/a"}], "summary": {"s": 3}}
    assert common.read_result("missing", tmp_path) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_loadgen_summary_uses_vllm_definitions():
    r1 = loadgen.RequestResult(ok=True, ttft=0.1, e2e=1.0, itl=[0.3, 0.3, 0.3], output_tokens=10)
    r2 = loadgen.RequestResult(ok=True, ttft=0.3, e2e=2.1, itl=[0.6, 0.6, 0.6], output_tokens=10)
    bad = loadgen.RequestResult(error="HTTP 503")
    s = loadgen.summarize([r1, r2, bad], duration=4.0, concurrency=2)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["output_tokens"] == 20 and s["output_tok_s"] == 5.0 and s["requests_s"] == 0.5
    assert r1.tpot == pytest.approx(0.1) and r2.tpot == pytest.approx(0.2)  # (e2e - ttft) / (tokens - 1)
    assert s["tpot_ms_p50"] == pytest.approx(150.0) and s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["itl_ms_p50"] == pytest.approx(450.0)


def test_aiperf_summary_parse_and_command():
    d = {"request_count": {"avg": 8.0}, "output_token_throughput": {"avg": 120.0},
         "request_throughput": {"avg": 2.0}, "time_to_first_token": {"p50": 30.0, "p99": 60.0},
         "inter_token_latency": {"p50": 10.0, "p99": 12.0}, "inter_chunk_latency": {"p50": 9.0, "p99": 20.0},
         "request_latency": {"p50": 700.0, "p99": 900.0}, "error_summary": [{"count": 1}]}
    p = aiperf_client.parse(d, 4)
    assert p["output_tok_s"] == 120.0 and p["ttft_ms_p99"] == 60.0 and p["tpot_ms_p50"] == 10.0
    assert p["failed"] == 1 and p["concurrency"] == 4 and p["isl"] is None
    cmd = aiperf_client.command("http://127.0.0.1:1", "m", Path("/tok"), 16, 32, 128, 64, Path("/out"))
    joined = " ".join(cmd)
    assert "--tokenizer /tok" in joined and "--concurrency 16" in joined and "ignore_eos:true" in joined


def test_headline_verdicts():
    results = {
        "http_overhead": {"rows": [{"concurrency": 16, "server_vs_hf_seq": 12.0, "server_vs_hf_batch": 1.2,
                                    "http_overhead": 0.05}], "summary": {"server": {"peak_rss_mib": 512.4}}},
        "serving": {"summary": {"ratios": [{"concurrency": 4, "tok_s_ratio": 1.1, "ttft_p50_ratio": 1.3,
                                            "tpot_p50_ratio": 0.9},
                                           {"concurrency": 64, "tok_s_ratio": 0.8, "ttft_p50_ratio": 2.0,
                                            "tpot_p50_ratio": 1.0}], "servers": {}}},
        "speculative": {"rows": [{"prompt_set": "code", "batch": 1, "k": 2, "accept_pos": "0.80 0.50",
                                  "accept_rate": 0.65, "mean_accept_len": 2.3}],
                        "summary": {"best_batch1": {"code": {"k": 2, "speedup": 1.8, "same": "8/8"},
                                                    "prose": {"k": 1, "speedup": 1.2, "same": "8/8"}},
                                    "best_by_batch": {"8": {"code": {"k": 1, "speedup": 1.1, "same": "8/8"}}}}},
        "dsa": {"rows": [], "summary": {"decode_ratio_16k": 0.5, "prefill_ratio_16k": 0.4}},
    }
    v = {row["figure"]: row["verdict"] for row in run_all.headline(results)}
    assert v["server over HTTP / hf one-at-a-time, C=16"] == "PASS"
    assert v["server over HTTP / hf padded batch of 16"] == "MISS"
    assert v["HTTP+SSE overhead (1 - server/engine), C=16"] == "PASS"
    assert v["glm-serve / vLLM output tok/s, C=4"] == "PASS" and v["glm-serve / vLLM TTFT p50, C=4"] == "MISS"
    assert v["glm-serve / vLLM output tok/s, C=64"] == "info"  # no target at 64
    assert v["best K (K=2) tok/s / K=0, batch 1, code"] == "PASS"
    assert v["best K (K=1) tok/s / K=0, batch 1, prose"] == "MISS"
    assert v["best K (K=1) tok/s / K=0, batch 8, code"] == "info"
    assert v["acceptance by position, K=2, batch 1, code"] == "info"
    assert v["decode step DSA / dense at 16K"] == "MISS" and v["prefill DSA / dense at 16K"] == "PASS"
    assert v["glm-serve peak RSS, process tree (shipped model)"] == "info"


def test_speculative_speedups_pair_runs_of_one_repeat():
    """The speed-up is the median of per-repeat ratios (runs seconds apart), not a ratio of medians, and the
    engines take turns in reverse order every other repeat."""
    import speculative

    # K = 0 slowed by a drift in repeat 2 as much as the other engine: the paired ratio stays 1.5 throughout.
    got = speculative.paired([3.0, 1.5, 3.0], [2.0, 1.0, 2.0])
    assert got == {"speedup": 1.5, "speedup_runs": [1.5, 1.5, 1.5]}
    assert speculative.paired([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])["speedup"] == 2.0  # the median
    engines = {"a": 1, "b": 2}
    assert [k for k, _ in speculative.in_turn(engines, 0)] == ["a", "b"]
    assert [k for k, _ in speculative.in_turn(engines, 1)] == ["b", "a"]


def test_speculative_prompt_sets(monkeypatch, tmp_path):
    import engine_runs

    src = '"""A module docstring that is long enough to count as a real English paragraph of prose here."""\n' \
          "# a comment block that is also plain English, written over\n# two lines so it is joined into one\n" \
          "x = {'a': [1, 2], 'b': (3, 4)}  # short\n"
    assert engine_runs._prose_of(src) == [
        "A module docstring that is long enough to count as a real English paragraph of prose here.",
        "a comment block that is also plain English, written over two lines so it is joined into one"]
    monkeypatch.setattr(engine_runs, "ROOT", tmp_path)  # no held-out split: the built-in paragraphs
    assert engine_runs.prose_texts() == ["\n\n".join(engine_runs.FALLBACK_PROSE)]
    with pytest.raises(ValueError):
        engine_runs.prompt_set("poetry", tmp_path, 1, 4)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tests.engine_fixtures import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt")


def test_in_process_benchmarks_write_tables_and_json(tiny_ckpt, tmp_path, capsys):
    import cache_bytes
    import dsa
    import speculative

    out = ["--out-dir", str(tmp_path), "--threads", "1"]
    assert cache_bytes.main(["--model", str(tiny_ckpt), "--out-dir", str(tmp_path)]) == 0
    assert speculative.main(["--model", str(tiny_ckpt), "--k", "0", "1", "--batch", "1", "--prompts", "2",
                             "--prompt-tokens", "6", "--max-tokens", "4", "--repeats", "1", *out]) == 0
    assert dsa.main(["--model", str(tiny_ckpt), "--contexts", "12", "20", "--chunk", "8", "--decode-steps", "2",
                     "--decode-rounds", "2", "--prefill-repeats", "1",
                     *out]) == 0
    printed = capsys.readouterr().out
    assert "KV cache bytes per token" in printed and "MTP speculative decoding" in printed
    assert "DSA vs dense" in printed

    cb = json.loads((tmp_path / "cache_bytes.json").read_text())
    assert cb["rows"][-1]["model"] == "ckpt" and cb["rows"][-1]["checked"] is True
    m = json.loads((tmp_path / "speculative.json").read_text())
    assert [(r["prompt_set"], r["k"]) for r in m["rows"]] == [("code", 0), ("code", 1), ("prose", 0), ("prose", 1)]
    k0 = next(r for r in m["rows"] if r["k"] == 0)
    assert k0["tok_s"] > 0 and k0["same"] == "2/2" and "tokens" not in k0
    k1 = [r for r in m["rows"] if r["k"] == 1 and r["drafts"]]
    assert all(1 <= r["mean_accept_len"] <= 2 and len(r["accept_by_pos"]) == 1 for r in k1)
    assert set(m["summary"]["best_batch1"]) <= {"code", "prose"} and m["meta"]["prompt_sets"] == ["code", "prose"]
    assert m["meta"]["threads"] == 1 and "loadavg_1m" in m["meta"]
    d = json.loads((tmp_path / "dsa.json").read_text())
    assert [r["context"] for r in d["rows"]] == [12, 20] and all(r["sparse_decode_ms"] > 0 for r in d["rows"])
    assert d["rows"][0]["read_share"] == pytest.approx(8 / 12)  # tiny index_topk = 8

    # The issue-18 A/B: the default configuration (adaptive MTP, K = 3) against K = 0.
    assert speculative.main(["--model", str(tiny_ckpt), "--ab", "--batch", "1", "3", "--prompts", "2", "--waves", "2",
                             "--prompt-set", "code", "--prompt-tokens", "6", "--max-tokens", "6", "--repeats", "1",
                             *out]) == 0
    ab = json.loads((tmp_path / "speculative_ab.json").read_text())
    assert [(r["batch"], r["config"], r["k"]) for r in ab["rows"]] == [(1, "adaptive", 3), (1, "K=0", 0),
                                                                        (3, "adaptive", 3), (3, "K=0", 0)]
    assert all(r["same"] == f"{2 * r['batch']}/{2 * r['batch']}" and r["tok_s"] > 0 for r in ab["rows"])
    assert len(ab["rows"][0]["depth_steps"]) == 4 and sum(ab["rows"][0]["depth_steps"]) > 0
    adaptive = ab["rows"][0]  # its step trace: every step recorded, steady ones timed per depth
    assert adaptive["trace_steps"] == sum(adaptive["depth_steps"])  # every step after the warm-up
    assert len(adaptive["steady_steps"]) == 4 and 0 < sum(adaptive["steady_steps"]) <= adaptive["trace_steps"]
    assert adaptive["steady_ms"].count(" ") == 3 and adaptive["k0_ms_per_step"] > 0
    assert ab["summary"]["targets"] == {"1": 1.25, "3": 0.98}
    assert all(len(r["speedup_runs"]) == 1 for r in ab["rows"]) and ab["rows"][1]["speedup"] == 1.0
    assert "Adaptive MTP (K <= 3) vs --num-speculative-tokens 0" in capsys.readouterr().out
    # --ab-k: adaptive engines of several largest depths against the same K = 0, in one run
    assert speculative.main(["--model", str(tiny_ckpt), "--ab", "--ab-k", "2", "3", "--batch", "1", "--prompts", "2",
                             "--prompt-set", "code", "--prompt-tokens", "6", "--max-tokens", "6", "--repeats", "1",
                             "--name", "ab_k", *out]) == 0
    abk = json.loads((tmp_path / "ab_k.json").read_text())
    assert [(r["config"], r["k"], len(r["depth_steps"])) for r in abk["rows"]] == [
        ("adaptive<=2", 2, 3), ("adaptive", 3, 4), ("K=0", 0, 0)]  # K = 0 counts no depths
    assert set(abk["summary"]["by_batch"]) == {"code B=1<=2", "code B=1"}
    assert "Adaptive MTP (K <= 2 / 3)" in capsys.readouterr().out

    import profile_engine

    assert profile_engine.main(["steps", "--model", str(tiny_ckpt), "--batches", "1", "3", "--prompt-tokens", "5",
                                "--max-tokens", "5", *out]) == 0
    steps = json.loads((tmp_path / "profile_steps.json").read_text())["summary"]["rows"]
    assert [r["batch"] for r in steps] == [1, 3] and all(r["step_ms"] > 0 and r["forward_ms"] > 0 for r in steps)
    assert "ms_per_extra_seq" in steps[1] and "API process (not timed)" in capsys.readouterr().out
    assert profile_engine.main(["steps", "--model", str(tiny_ckpt), "--batches", "2", "--prompt-tokens", "5",
                                "--max-tokens", "4", "--detokenize", "engine", *out]) == 0
    assert "detokenized in the engine" in capsys.readouterr().out

    rows = run_all.report(tmp_path, ["cache_bytes", "speculative", "dsa"])
    assert any(r["benchmark"] == "speculative" for r in rows) and (tmp_path / "summary.json").is_file()
    assert "headline figures" in capsys.readouterr().out


def test_varied_lengths_reach_each_request(tiny_ckpt):
    """--vary-lengths: seeded per-request lengths around the mean, and the closed loop gives each request its own."""
    import speculative
    from engine_runs import closed_loop

    lengths = speculative.varied_lengths(200, 64)
    assert lengths == speculative.varied_lengths(200, 64) and min(lengths) >= 32 and max(lengths) <= 96
    assert 56 <= sum(lengths) / len(lengths) <= 72 and len(set(lengths)) > 30
    engine = speculative.make_engine(tiny_ckpt, 0, 2, [[5, 6, 7]] * 3, [2, 5, 3])
    run = closed_loop(engine, [[5, 6, 7], [8, 9], [10]], [2, 5, 3], 2)
    assert [len(t) for t in run.tokens] == [2, 5, 3] and run.output_tokens == 10


def test_skinny_gemm_compares_both_products_and_the_engine_under_both_rules(tiny_ckpt, tmp_path, capsys):
    import skinny_gemm

    assert skinny_gemm.main(["--model", str(tiny_ckpt), "--repeats", "1", "--prompts", "1", "--prompt-tokens", "6",
                             "--max-tokens", "4", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "skinny_gemm.json").read_text())
    micro = [r for r in res["rows"] if "weight" in r]
    assert {r["rows"] for r in micro} == {1, 2, 3, 4, 8} and {r["dtype"] for r in micro} == {"float32", "bfloat16"}
    assert all(r["f_linear_us"] > 0 and r["wx_us"] > 0 for r in micro)
    import torch  # the reordered product is timed wherever this torch has oneDNN (fp32 always then)
    fp32 = [r for r in micro if r["dtype"] == "float32"]
    assert all((r["packed_us"] or 0) > 0 for r in fp32) == torch.backends.mkldnn.is_available()
    ab = [r for r in res["rows"] if "k" in r]
    assert [r["k"] for r in ab] == [0, 1] and all(r["same_tokens"] and r["ratio"] > 0 for r in ab)
    assert set(res["meta"]["decided"]) == {"float32", "float32 tall", "bfloat16", "bfloat16 tall"}
    assert "timed / always" in capsys.readouterr().out


def test_profile_steps_ab_against_a_baseline_checkout(tiny_ckpt, tmp_path, capsys):
    """steps --baseline: both checkouts' own `steps` in fresh processes (here this tree against itself), per batch
    size before/after step and outside-forward times, per-extra-sequence slopes, one JSON and one plot."""
    import profile_engine

    root = Path(__file__).resolve().parents[1]
    assert profile_engine.main(["steps", "--baseline", str(root), "--repeats", "1", "--model", str(tiny_ckpt),
                                "--batches", "1", "3", "--prompt-tokens", "5", "--max-tokens", "5",
                                "--out-dir", str(tmp_path), "--threads", "1"]) == 0
    res = json.loads((tmp_path / "profile_steps.json").read_text())["summary"]
    assert [r["batch"] for r in res["rows"]] == [1, 3]
    assert all(r[f"{side}_{key}"] > 0 for r in res["rows"] for side in ("before", "after")
               for key in ("step_ms", "forward_ms", "rest_ms"))
    assert {"before_step_per_seq", "after_rest_per_seq"} <= set(res["rows"][1])
    assert len(res["runs"]["before"]) == len(res["runs"]["after"]) == 1
    assert "median of 1 alternating runs" in capsys.readouterr().out


def test_tp_bench_cpu_smoke(tmp_path):
    """bench/tp_bench.py --cpu-smoke: the engine at tensor_parallel_size 2 (gloo) against 1 on a tiny model, in
    its own process (it spawns the ranks); same logits within fp32 rounding, same greedy tokens, both timed."""
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "tp_bench.py"), "--cpu-smoke", "--out-dir", str(tmp_path),
                           "--budget-s", "240"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "tp_gpu-smoke.json").read_text())
    c = res["correctness"]
    assert c["logit_tokens"] > c["index_topk"] and c["max_abs_logit_diff_fp32"] <= 1e-5
    assert c["argmax_agree"] == 1.0 and c["greedy_identical"] == "4/4"
    assert [r["batch"] for r in res["rows"]] == [1, 4]
    assert all(r["tp2_step_ms"] > 0 and r["tp1_step_ms"] > 0 for r in res["rows"])
    assert "tensor parallel 2 vs 1" in proc.stdout


def test_gpu_bench_decode_graph_trial_skips_cleanly_on_cpu(tiny_ckpt):
    """bench/gpu.sh's CUDA-graph check: its decode inputs (built ahead, as the runner builds them) run a real
    decode step; without CUDA it times eager and reports the graph skipped; the logits verdict is strict."""
    import gpu_bench
    import torch

    from model.loader import load_model

    model = load_model(tiny_ckpt, torch.float32, "cpu").eval()
    ids, fb = gpu_bench.decode_inputs(model.config, 3, 20, torch.float32, "cpu", block_size=8)
    assert ids.shape == (3,) and fb.query_lens == [1, 1, 1] and fb.context_lens == [21] * 3
    assert fb.slot_mapping.tolist() == [2 * 8 + 4, 5 * 8 + 4, 8 * 8 + 4]  # 3 blocks each, position 20 in the third
    with torch.inference_mode():
        assert model.logits(model(ids, fb)).shape == (3, model.config.vocab_size)
    res = gpu_bench.cuda_graph_trial(tiny_ckpt, "cpu", torch.float32, 2, 12, reps=2)
    assert res["graph"] == "skipped: no CUDA" and res["eager_ms"] > 0 and res["batch"] == 2
    assert gpu_bench.graph_verdict(0.0, 0.0, 10.0)
    assert gpu_bench.graph_verdict(0.004, 0.003, 10.0) and not gpu_bench.graph_verdict(0.5, 0.0, 10.0)


def test_moe_bench_compares_loop_and_grouped(tmp_path, capsys):
    import moe

    assert moe.main(["--tokens", "1", "5", "--repeats", "1", "--shapes", "shipped", "--threads", "1",
                     "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "moe.json").read_text())
    assert [r["tokens"] for r in res["rows"]] == [1, 5]
    assert all(r["loop_ms"] > 0 and r["grouped_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in res["rows"])
    assert res["rows"][0]["experts_used"] == 2 and "loadavg_1m" in res["meta"]
    assert "per-expert loop vs grouped GEMM" in capsys.readouterr().out


def test_pinned_servers_keep_their_whole_process_tree_on_the_listed_cores(tmp_path):
    """bench/serving.py's pinned mode: a server and the processes it starts (engine core, workers) stay on
    --server-cpus."""
    import servers

    probe = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), flush=True); subprocess.run("
             "[sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])")
    srv = servers._spawn("probe", [sys.executable, "-c", probe], dict(os.environ), 0, tmp_path / "log", cpus=[0])
    assert srv.proc.wait(timeout=60) == 0
    assert (tmp_path / "log").read_text().split() == ["[0]", "[0]"]


def test_serving_pinned_mode_wants_disjoint_server_and_client_cores():
    import serving

    for argv in (["--server-cpus", "0"], ["--server-cpus", "0", "--client-cpus", "0"]):
        with pytest.raises(SystemExit):
            serving.main(argv)


def test_tool_probe_reads_the_call_name_and_each_argument_value_position(tmp_path):
    """tool_probe scores the top token after `<tool_call>` (the name) and after each `<arg_value>`, in the
    assistant's call (not the system turn's sample call). A stand-in model that predicts the rendered text's own
    next token is right everywhere; one that is right everywhere but at argument values scores 0 there."""
    import tool_probe
    import torch

    from model.build_tokenizer import ENDOFTEXT, GLM_CHAT_TEMPLATE, train_tokenizer, write_tokenizer_dir
    from model.tokenizer import ChatTemplate, Tokenizer
    from model.tool_data import ToolDocs, eval_prompts

    docs = [d["text"] for d in ToolDocs(ChatTemplate(GLM_CHAT_TEMPLATE), ENDOFTEXT).tool_docs(40)]
    write_tokenizer_dir(train_tokenizer(docs, vocab_size=600), tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    record = next(r for r in eval_prompts([]) if r["tool"] == "gcd")
    value_open = tok.token_to_id("<arg_value>")

    class Oracle:  # "hidden" = the ids; logits: one-hot of the next id in the text (optionally wrong at values)
        def __init__(self, wrong_values: bool) -> None:
            self.wrong_values = wrong_values

        def __call__(self, x, fb):
            return x

        def logits(self, ids):
            nxt = torch.cat([ids[1:], ids[-1:]])
            nxt = torch.where((ids == value_open) & self.wrong_values, (nxt + 1) % tok.vocab_size, nxt)
            return torch.nn.functional.one_hot(nxt, tok.vocab_size).float()

    def scores(model, r):
        return [(kind, right) for kind, right, _ in tool_probe.probe(model, tok, r)]

    right = scores(Oracle(False), record)
    assert right == [("name", True), ("argument", True), ("argument", True)]  # gcd(a, b)
    assert scores(Oracle(True), record) == [("name", True), ("argument", False), ("argument", False)]
    wrong = tool_probe.probe(Oracle(True), tok, record)[1]  # the top token is reported: the value's id + 1
    assert wrong[2] == tok.decode([tok.encode(str(record["arguments"]["a"]))[0] + 1])
    renamed = tool_probe.aliased(record, random.Random(0))  # every offered tool under a fresh name
    names = [t["function"]["name"] for t in renamed["tools"]]
    assert renamed["tool"] in names and len(set(names)) == len(names) and "gcd" not in names
    assert all(re.fullmatch(r"([bkzvmtlnrpsgdfhj][aeiou]){3,4}", n) for n in names)  # no word a model could guess
    assert renamed["split"] == record["split"] + "_aliased"
    assert scores(Oracle(False), renamed) == right


@pytest.mark.slow
def test_gpu_train_prepares_trains_and_exports_on_the_cpu(tmp_path):
    """bench/gpu_train.sh end to end on the CPU (--cpu-smoke): a small corpus and tokenizer, the packed carry, a
    few tiny steps, and weights split into parts that join into a checkpoint glm-serve loads, with the tokenizer."""
    import subprocess

    from model.loader import load_model

    root = BENCH.parent
    runs, carry, out = tmp_path / "runs", tmp_path / "carry", tmp_path / "out"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "model.corpus", "--out", str(runs / "data"), "--tool-docs", "40"], cwd=root, check=True,
                   capture_output=True)
    subprocess.run([*py, "model.build_tokenizer", "--corpus", str(runs / "data"), "--out", str(runs / "tokenizer")],
                   cwd=root, check=True, capture_output=True)
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CARRY": str(carry), "OUT": str(out),
           "RUN_DIR": str(tmp_path / "run")}
    script = str(BENCH / "gpu_train.sh")
    subprocess.run(["bash", script, "--prepare", str(runs)], cwd=root, env=env, check=True, capture_output=True)
    assert (carry / "train_tokens.pt.xz").exists() and (carry / "tokenizer" / "tokenizer.json").exists()
    proc = subprocess.run(["bash", script, "--cpu-smoke"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = sorted(out.glob("model.safetensors.part*"))
    assert len(parts) >= 2  # 34 MB of bf16 weights in parts of at most 15 MB
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in parts))
    subprocess.run(["tar", "-C", str(model_dir), "-xf", str(out / "meta.tar")], check=True)
    model = load_model(model_dir)
    assert model.has_mtp and (model_dir / "tokenizer.json").exists()
    assert json.loads((model_dir / "report.json").read_text())["step"] == 12


def test_gpu_graphs_smoke_compares_emulated_graphs_with_eager(tmp_path, monkeypatch):
    """bench/gpu_graphs.py (run by gpu.sh on a GPU) on the CPU: the graph runner emulated against --enforce-eager
    on the shipped model, tokens identical, every configuration timed."""
    import json

    import gpu_graphs

    import service.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "graph_mode", engine_mod.graph_mode)  # the smoke swaps it: restored after
    assert gpu_graphs.main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_graphs-smoke.json").read_text())
    assert [(r["k"], r["same"]) for r in res["tokens_fp32"]] == [(0, "4/4"), ("default", "4/4")]
    assert all(r["buckets"] and not r["broken"] for r in res["tokens_fp32"])
    assert [bool(r["draft_buckets"]) for r in res["tokens_fp32"]] == [False, True]  # drafts replay with MTP on
    assert all(0.0 <= r["drafted_graphs"] <= 1.0 for r in res["speed"])
    assert [(r["batch"], r["k"]) for r in res["speed"]] == [(1, 0), (1, "default"), (4, 0), (4, "default")]
    assert all(r["eager_tok_s"] > 0 and r["graph_tok_s"] > 0 and r["buckets"] > 0 for r in res["speed"])


def test_compile_bench_captures_a_real_decode_step(tiny_ckpt):
    """compile.py's inputs come from the engine's runner (its forward's signature changed once under it): the
    captured step is one decode row per sequence and the model runs it."""
    import compile as compile_bench
    import torch

    model, ids, fb = compile_bench.decode_inputs(tiny_ckpt, 2, prompt_tokens=24)
    assert ids.shape == (2,) and fb.query_lens == [1, 1] and fb.cache is not None
    with torch.inference_mode():
        assert model(ids, fb).shape == (2, model.config.hidden_size)


def test_cpu_layout_bench_compares_both_layouts(tiny_ckpt, tmp_path, capsys):
    import cpu_layout as layout_bench

    assert layout_bench.main(["--model", str(tiny_ckpt), "--repeats", "1", "--batch", "2", "--rows", "1", "--calls",
                              "2", "--prompts", "2", "--max-tokens", "4", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_layout.json").read_text())["rows"]
    micro = [r for r in rows if "cold_ratio" in r]
    engine = [r for r in rows if "same_tokens" in r]
    assert micro and all(r["cold_stored_us"] > 0 and r["hot_transposed_us"] > 0 for r in micro)
    assert [(r["k"], r["batch"]) for r in engine] == [(0, 2), ("default", 2)]
    assert all(r["same_tokens"] and r["ratio"] > 0 for r in engine)
    assert "transposed / stored" in capsys.readouterr().out
