"""Automatic prefix caching: caching on vs off, in one process, on three workloads.

    python bench/prefix_cache.py [--model DIR] [--conversations 8] [--turns 6] [--system-tokens 1500]
                                 [--user-tokens 48] [--max-tokens 32] [--think-s 1.0] [--repeats 3] [--threads 2]
                                 [--quick]

chat: `--conversations` conversations of `--turns` turns run at once. Every conversation opens with the same
`--system-tokens` system prompt (held-out code, tokenized: engine_runs.text_prompts) and each turn appends a user
message (`--user-tokens` of English prose, a different one per turn and conversation) to the whole history,
earlier replies included, as chat clients do; the reply is the greedy, ignore_eos completion of `--max-tokens`.
A conversation sends its next turn as soon as its previous reply is complete (a closed loop per conversation).
TTFT = request added -> first token on its engine's clock, in-process (no HTTP). Prompt tokens computed = prompt
positions the engine ran through the model (counted from each step's schedule: a cache hit skips its positions).
In lockstep the conversations' turns arrive together (replies have one length), so with caching every turn
waits for the other conversations' prefills in the same step, while without it the long prefills spread the
arrivals out: the two engines see different arrival patterns.

chat+think: the same conversations with a user's pause between a reply and the next turn (exponential, mean
`--think-s` seconds, seeded: the same pauses for both engines), as chat clients and agents send them. A run
idles until its next turn arrives: its clock jumps there (no wall time is spent), and a turn's TTFT counts
from its arrival, including its wait for the step in flight.

unshared: the same number of requests and prompt lengths, every prompt different from its first token on
(random token ids), `--conversations` at a time: the cost of hashing, registering and evicting when nothing is
ever reused. Output tokens/s over the run, and "bookkeeping": the share of the run spent inside prefix
caching's own code (lookups, admission, hashing and registering blocks), which machine noise barely touches.

Both workloads run on two engines loaded side by side (caching off, caching on), each with a cache of
`--cache-tokens` (the unshared run overflows it, so evictions are part of what it measures); the cached
prefixes are dropped before every run. The two engines run a workload paired: they take steps in turn and
each run's clock counts only its own steps, so load drift on a shared machine hits both alike. `--repeats`
pairs, medians reported. Targets (issue 16): chat TTFT p50 on turns >= 2 at least 4x lower with
caching, prompt tokens computed at least 75% fewer; unshared at most 3% slower. Writes
bench/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import checkpoints
from common import DEFAULT_THREADS, meta, percentile, pin_threads, print_table, warn_if_busy, write_result
from engine_runs import prose_prompts, random_prompts, text_prompts

COLUMNS = [("workload", "workload", ""), ("caching", "caching", ""), ("ttft_p50_turn1_ms", "TTFT p50 turn 1 ms", ".0f"),
           ("ttft_p50_later_ms", "TTFT p50 turns>=2 ms", ".0f"), ("ttft_p99_later_ms", "p99 ms", ".0f"),
           ("prompt_tokens", "prompt tok", "d"), ("computed", "computed", "d"), ("cached_share", "cached", ".1%"),
           ("tok_s", "out tok/s", ".1f"), ("seconds", "s", ".1f"), ("cpu_s", "CPU s", ".1f"),
           ("bookkeeping_share", "bookkeeping", ".2%")]


def make_engine(model: Path, caching: bool, cache_tokens: int, max_len: int, seqs: int):
    from service.engine.config import EngineConfig
    from service.engine.engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(model=model, device="cpu", max_num_seqs=seqs, max_model_len=max_len,
                                                kv_cache_tokens=cache_tokens, enable_prefix_caching=caching))
    engine.prompt_computed = 0  # prompt positions run through the model, counted by the wrapper below
    schedule = engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        for seq, n in out.scheduled:  # num_computed_tokens is still the step's start (after any hit)
            engine.prompt_computed += max(0, min(n, seq.num_prompt_tokens - seq.num_computed_tokens))
        return out

    engine.scheduler.schedule = counting_schedule
    # Time inside prefix caching's own bookkeeping (lookups, admission, hashing and registering blocks): its
    # share of a run is the overhead, measured apart from the machine's noise on the run's total.
    engine.bookkeeping_s = 0.0
    bm = engine.block_manager
    for name in ("match", "admit", "cache_computed"):
        setattr(bm, name, timed(engine, getattr(bm, name)))
    return engine


def timed(engine, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            engine.bookkeeping_s += time.perf_counter() - t
    return wrapper


class Run:
    """One workload on one engine, advanced a step at a time. Its clock counts only its own steps, so two runs
    advanced in turn (`drive_paired`) see the same machine load, and neither's wait counts against the other."""

    def __init__(self, engine, start: list[tuple[str, list[int]]], follow_up, max_tokens: int) -> None:
        from service.engine.sampling_params import SamplingParams

        self.engine, self.follow_up = engine, follow_up
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        engine.block_manager.pool.reset()  # every run starts with nothing cached
        self.clock = self.cpu = 0.0
        self.added, self.ttft, self.replies, self.prompt_len = {}, {}, {}, {}
        self.pending: list[tuple[float, str, list[int]]] = []  # (arrival on this run's clock, id, prompt)
        self.base = engine.prompt_computed, engine.stats().prefix_cache_hits, engine.bookkeeping_s
        for rid, prompt in start:
            self.add(rid, prompt)

    def add(self, rid: str, prompt: list[int], arrival: float | None = None) -> None:
        """Submit now; `arrival` (earlier) is when the client sent it: its wait for this step counts in TTFT."""
        self.added[rid], self.replies[rid], self.prompt_len[rid] = arrival or self.clock, [], len(prompt)
        self.engine.add_request(rid, prompt, self.params)

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished() and not self.pending

    def step(self) -> None:
        if not self.engine.has_unfinished():  # idle until the next turn arrives: the clock jumps there
            self.clock = max(self.clock, min(p[0] for p in self.pending))
        for due in [p for p in self.pending if p[0] <= self.clock]:
            self.pending.remove(due)
            self.add(due[1], due[2], arrival=due[0])
        t, c = time.perf_counter(), time.process_time()
        outs = self.engine.step()
        self.clock += time.perf_counter() - t
        self.cpu += time.process_time() - c
        for out in outs:
            new = out.outputs[0].token_ids if out.outputs else []
            if new and out.request_id not in self.ttft:
                self.ttft[out.request_id] = self.clock - self.added[out.request_id]
            self.replies[out.request_id] += new
            if out.finished and (nxt := self.follow_up(out.request_id, self.replies[out.request_id])) is not None:
                rid, prompt, *think = nxt
                if think and think[0] > 0:  # the user reads the reply and types the next turn
                    self.pending.append((self.clock + think[0], rid, prompt))
                else:
                    self.add(rid, prompt)

    def result(self) -> dict:
        e, (computed0, hits0, book0) = self.engine, self.base
        return {"seconds": self.clock, "cpu_s": self.cpu, "bookkeeping_s": e.bookkeeping_s - book0,
                "ttft": self.ttft, "prompt_tokens": sum(self.prompt_len.values()),
                "computed": e.prompt_computed - computed0, "hits": e.stats().prefix_cache_hits - hits0,
                "output_tokens": sum(len(r) for r in self.replies.values())}


def drive_paired(runs: list[Run]) -> list[dict]:
    """Advance the runs one step each in turn until all are done."""
    while not all(r.done for r in runs):
        for r in runs:
            if not r.done:
                r.step()
    return [r.result() for r in runs]


def chat_run(engine, system: list[int], users: list[list[list[int]]], max_tokens: int,
             think: list[list[float]] | None = None) -> Run:
    """`think[c][t]`: seconds between turn t's reply and turn t+1 of conversation c (None: none, lockstep)."""
    history = [list(system) + users[c][0] for c in range(len(users))]

    def follow_up(rid: str, reply: list[int]):
        c, t = map(int, rid[1:].split("t"))
        if t + 1 == len(users[c]):
            return None
        history[c] += reply + users[c][t + 1]
        return f"c{c}t{t + 1}", list(history[c]), think[c][t] if think else 0.0

    return Run(engine, [(f"c{c}t0", list(history[c])) for c in range(len(users))], follow_up, max_tokens)


def split_turns(run: dict) -> dict:
    run["turn1"] = [v for k, v in run["ttft"].items() if k.endswith("t0")]
    run["later"] = [v for k, v in run["ttft"].items() if not k.endswith("t0")]
    return run


def unshared_run(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> Run:
    todo = [(f"u{i}", p) for i, p in enumerate(prompts)][::-1]
    start = [todo.pop() for _ in range(min(concurrency, len(todo)))]
    return Run(engine, start, lambda rid, reply: todo.pop() if todo else None, max_tokens)


def row(workload: str, caching: bool, runs: list[dict]) -> dict:
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run's counts
    out = {"workload": workload, "caching": "on" if caching else "off",
           "seconds": statistics.median(r["seconds"] for r in runs),
           "tok_s": statistics.median(r["output_tokens"] / r["seconds"] for r in runs),
           "seconds_runs": [r["seconds"] for r in runs], "cpu_s": statistics.median(r["cpu_s"] for r in runs),
           "bookkeeping_share": statistics.median(r["bookkeeping_s"] / r["seconds"] for r in runs),
           "prompt_tokens": mid["prompt_tokens"],
           "computed": mid["computed"], "hits": mid["hits"], "cached_share": 1 - mid["computed"] / mid["prompt_tokens"]}
    if "later" in mid:
        later = [x for r in runs for x in r["later"]]
        first = [x for r in runs for x in r["turn1"]]
        out.update(ttft_p50_turn1_ms=1e3 * percentile(first, 50), ttft_p50_later_ms=1e3 * percentile(later, 50),
                   ttft_p99_later_ms=1e3 * percentile(later, 99))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--user-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--think-s", type=float, default=1.0,
                    help="mean of the exponential pause between a reply and the next turn (chat+think workload)")
    ap.add_argument("--cache-tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--quick", action="store_true", help="smoke sizes: checks the plumbing only")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.conversations, args.turns, args.system_tokens, args.user_tokens = 2, 2, 40, 8
        args.max_tokens, args.repeats, args.cache_tokens = 4, 1, 512
    threads = pin_threads(args.threads)
    warn_if_busy()
    model = checkpoints.model_or_shipped(args.model)
    C, T = args.conversations, args.turns
    system = text_prompts(model, 1, args.system_tokens, seed=1)[0]
    flat = prose_prompts(model, C * T, args.user_tokens, seed=2)
    users = [flat[c * T:(c + 1) * T] for c in range(C)]
    longest = args.system_tokens + T * (args.user_tokens + args.max_tokens)
    engines = {caching: make_engine(model, caching, args.cache_tokens, longest + 8, C) for caching in (False, True)}
    vocab = engines[False].model_config.vocab_size
    for engine in engines.values():  # warm up: first-call allocations and oneDNN reorders
        drive_paired([unshared_run(engine, random_prompts(2, 64, vocab, seed=99), 2, 4)])

    chat = {False: [], True: []}
    chat_think = {False: [], True: []}
    unshared = {False: [], True: []}
    for rep in range(args.repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)  # alternate who steps first
        runs = drive_paired([chat_run(engines[c], system, users, args.max_tokens) for c in order])
        for c, r in zip(order, runs, strict=True):
            chat[c].append(split_turns(r))
        rng = random.Random(300 + rep)  # the same pauses for both engines
        think = [[rng.expovariate(1 / args.think_s) for _ in range(T)] for _ in range(C)]
        runs = drive_paired([chat_run(engines[c], system, users, args.max_tokens, think) for c in order])
        for c, r in zip(order, runs, strict=True):
            chat_think[c].append(split_turns(r))
        # The unshared prompts: chat's prompt lengths, each starting from a different random token.
        lengths = [args.system_tokens + (t + 1) * args.user_tokens + t * args.max_tokens for t in range(T)] * C
        prompts = random_prompts(len(lengths), max(lengths), vocab, seed=100 + rep)
        prompts = [p[:n] for p, n in zip(prompts, lengths, strict=True)]
        runs = drive_paired([unshared_run(engines[c], prompts, C, args.max_tokens) for c in order])
        for c, r in zip(order, runs, strict=True):
            unshared[c].append(r)
    rows = [row("chat", c, chat[c]) for c in (False, True)] + [row("unshared", c, unshared[c]) for c in (False, True)]
    rows += [row("chat+think", c, chat_think[c]) for c in (False, True)]
    off, on = rows[0], rows[1]
    summary = {
        "ttft_p50_later_speedup": off["ttft_p50_later_ms"] / on["ttft_p50_later_ms"],
        "ttft_p50_later_speedup_think": rows[4]["ttft_p50_later_ms"] / rows[5]["ttft_p50_later_ms"],
        "prompt_computed_reduction": 1 - on["computed"] / off["computed"],
        "unshared_slowdown": rows[2]["tok_s"] / rows[3]["tok_s"] - 1,
        "unshared_cpu_ratio": rows[3]["cpu_s"] / rows[2]["cpu_s"] - 1,
        "unshared_bookkeeping_share": rows[3]["bookkeeping_share"],
        "unshared_slowdown_runs": [a["output_tokens"] / a["seconds"] / (b["output_tokens"] / b["seconds"]) - 1
                                   for a, b in zip(unshared[False], unshared[True], strict=True)],
        "targets": {"ttft_p50_later_speedup": 4.0, "prompt_computed_reduction": 0.75, "unshared_slowdown": 0.03},
    }
    print_table(f"prefix caching, {C} conversations x {T} turns over a {args.system_tokens}-token system prompt; "
                f"unshared: the same lengths, nothing in common ({threads} threads, medians of {args.repeats})",
                COLUMNS, rows)
    print(f"\nTTFT p50 turns >= 2: {summary['ttft_p50_later_speedup']:.1f}x lower with caching in lockstep, "
          f"{summary['ttft_p50_later_speedup_think']:.1f}x with pauses between turns (target >= 4x); "
          f"prompt tokens computed {summary['prompt_computed_reduction']:.1%} fewer (target >= 75%); "
          f"unshared {summary['unshared_slowdown']:+.1%} wall, {summary['unshared_cpu_ratio']:+.1%} process CPU, "
          f"bookkeeping {summary['unshared_bookkeeping_share']:.2%} of the run (target <= +3%)")
    config = {k: v for k, v in vars(args).items() if k not in ("model", "out_dir", "threads")}
    write_result("prefix_cache", rows, meta(threads, model=str(model), **config), summary, args.out_dir)


if __name__ == "__main__":
    main()
