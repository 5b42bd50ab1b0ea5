"""Test helpers for the service: a tiny tokenizer, a fake engine, in-thread and subprocess servers.

`FakeAsyncEngine` honours the Engine interface (generate/abort/stats/start/shutdown, tokenizer,
model_config, max_model_len, engine_config, is_alive/dead_reason) with a deterministic toy "model" and a
block-counting cache, so API behaviour (streaming, n, logprobs, stop, aborts, cache release, overload,
engine death) is tested fast and exactly. The end-to-end tests run the real engine on a tiny transformers
checkpoint (`make_tiny_checkpoint`).

Run a fake-engine server as a process (for signal tests):
    python -m tests.service_fixtures --model DIR --port N [any glm-serve flag]
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from service.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
CURRENT_TEST: Any = None  # the pytest item being set up or run (tests/conftest.py), None outside pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny test corpus.",
    "def add(a, b):\n    return a + b\n", "Numbers: 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Serving language models over HTTP with streaming responses.", "User asks; assistant answers politely.",
    "Caches, batches, tokens and logits make an inference engine.", "Ünïcödé text: naïve café, 東京, emoji 🙂.",
]


# -- checkpoints ----------------------------------------------------------------------------------------------------
# The server-plumbing checkpoints keep a GLM-4-style template whose generation prompt opens no <think>: a random
# tiny model's output is then content, which these tests read. GLM-5's template has tests of its own
# (test_tokenizer.py, test_reasoning_e2e.py).
PLAIN_CHAT_TEMPLATE = (Path(__file__).parent / "data" / "plain_chat_template.jinja").read_text()


def build_tokenizer_dir(out: Path, vocab_size: int = 400) -> Path:
    """A GLM-style byte-level BPE tokenizer (model/build_tokenizer.py) trained on a few sentences."""
    from model.build_tokenizer import train_tokenizer, write_tokenizer_dir

    tok = train_tokenizer(CORPUS * 20, vocab_size=vocab_size, min_frequency=1)
    write_tokenizer_dir(tok, out, chat_template=PLAIN_CHAT_TEMPLATE)
    return out


def make_fake_model_dir(out: Path) -> Path:
    """Tokenizer files plus a config.json naming the vocabulary; enough for FakeAsyncEngine and --model."""
    build_tokenizer_dir(out)
    vocab = Tokenizer.from_dir(out).vocab_size
    (out / "config.json").write_text(json.dumps({"architectures": ["GlmMoeDsaForCausalLM"],
                                                 "model_type": "glm_moe_dsa", "vocab_size": vocab}))
    return out


_CACHE: dict[str, Path] = {}


def shared_fake_model_dir() -> Path:
    """One fake model directory per test process (tokenizer training takes a moment)."""
    if "fake" not in _CACHE:
        import tempfile

        _CACHE["fake"] = make_fake_model_dir(Path(tempfile.mkdtemp(prefix="glm-serve-fake-")) / "tiny-fake")
    return _CACHE["fake"]


def make_tiny_checkpoint(out: Path, index_topk: int = 8) -> Path:
    """A random GlmMoeDsa checkpoint written by transformers itself, with the tiny tokenizer beside it."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer_dir(out)
    tok = Tokenizer.from_dir(out)
    gen_config = json.loads((out / "generation_config.json").read_text())
    cfg = GlmMoeDsaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, head_dim=8, first_k_dense_replace=1, index_topk=index_topk, index_head_dim=16,
        index_n_heads=2, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=sorted(tok.eos_token_ids),
        pad_token_id=gen_config.get("pad_token_id"))
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(cfg)
    model.save_pretrained(out)
    # save_pretrained wrote its own generation_config.json; ours carries GLM's three eos ids
    (out / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    return out


# -- the fake engine ------------------------------------------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    emitted_text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    rng: random.Random | None = None


@dataclass
class _Req:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[RequestOutput]
    arrival: float
    choices: list[_Choice]
    blocks: int = 0
    first_sent: bool = False
    scheduled_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


class FakeAsyncEngine:
    """A deterministic toy model behind the Engine interface, one step every `step_s` seconds."""

    def __init__(self, model_dir: Path, max_model_len: int = 256, max_num_seqs: int = 8, num_blocks: int = 256,
                 block_size: int = 16, step_s: float = 0.002) -> None:
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model_config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size,
                                            eos_token_id=sorted(self.tokenizer.eos_token_ids))
        self.max_model_len = max_model_len
        self.engine_config = EngineConfig(model=model_dir, max_num_seqs=max_num_seqs, block_size=block_size,
                                          kv_cache_tokens=num_blocks * block_size)
        self.num_blocks, self.block_size, self.step_s = num_blocks, block_size, step_s
        special = self.tokenizer.special_token_ids | self.tokenizer.eos_token_ids
        # tokens that are whole characters on their own, so toy outputs are valid text at every step
        self._plain = [i for i in range(self.tokenizer.vocab_size) if i not in special
                       and "\ufffd" not in self.tokenizer.decode([i]) and self.tokenizer.decode([i]).isprintable()]
        self._eos = min(self.tokenizer.eos_token_ids)
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.requests: dict[str, _Req] = {}
        self.used_blocks = 0
        self.held = False  # tests: freeze the step loop (requests stay waiting)
        self.is_alive = False
        self.dead_reason: str | None = None
        self.aborted: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.is_alive = True
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def shutdown(self) -> None:
        self.is_alive = False
        if self._task is not None:
            self._task.cancel()

    def kill(self, reason: str) -> None:
        """Simulate an engine fault: every request ends with `error`, the loop stops."""
        self.is_alive, self.dead_reason = False, reason
        for req in list(self.requests.values()):
            outs = [CompletionOutput(c.index, "", [], finish_reason="error")
                    for c in req.choices if not c.finish_reason]
            req.queue.put_nowait(RequestOutput(req.request_id, outs, True, self._generated(req),
                                               error=reason))
            self._free(req)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_cache_usage=self.used_blocks / self.num_blocks)

    def num_unfinished(self) -> int:
        return len(self.requests)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        """Checks the request now (as the engine client does), queues it when iteration starts."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        if not self.is_alive:
            raise RuntimeError(f"engine is dead: {self.dead_reason}")
        return self._generate(request_id, prompt_token_ids, params)

    async def _generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        choices = [_Choice(i, rng=random.Random(f"{params.seed}-{i}") if params.seed is not None else random.Random())
                   for i in range(params.n)]
        req = _Req(request_id, list(prompt_token_ids), params, asyncio.Queue(), time.monotonic(), choices)
        self.requests[request_id] = req
        self.waiting.append(req)
        done = False
        try:
            while True:
                out = await req.queue.get()
                done = out.finished
                yield out
                if done:
                    return
        finally:
            if not done:
                self._abort(request_id, notify=False)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id, notify=True)

    # -- internals ---------------------------------------------------------------------------------------------
    def _abort(self, request_id: str, notify: bool) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        self.aborted.append(request_id)
        if notify:  # the consumer is still listening: end its stream with finish_reason "abort"
            outs = [CompletionOutput(c.index, "", [], finish_reason="abort")
                    for c in req.choices if not c.finish_reason]
            req.queue.put_nowait(RequestOutput(request_id, outs, True, self._generated(req)))
        self._free(req)

    def _free(self, req: _Req) -> None:
        self.requests.pop(req.request_id, None)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.used_blocks -= req.blocks
        req.blocks = 0

    @staticmethod
    def _generated(req: _Req) -> int:
        return sum(len(c.token_ids) for c in req.choices)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            if not self.held and self.is_alive:
                self._step()

    def _blocks_for(self, req: _Req) -> int:
        longest = len(req.prompt) + max((len(c.token_ids) for c in req.choices), default=0) + 1
        return math.ceil(longest / self.block_size) * len(req.choices)

    def _step(self) -> None:
        while self.waiting and len(self.running) < self.engine_config.max_num_seqs:
            req = self.waiting[0]
            need = self._blocks_for(req)
            if self.used_blocks + need > self.num_blocks:
                break
            self.waiting.popleft()
            req.blocks, req.scheduled_at = need, time.monotonic()
            self.used_blocks += need
            self.running.append(req)
        for req in list(self.running):
            self._decode(req)

    def _next(self, req: _Req, choice: _Choice) -> tuple[int, float, list[tuple[int, float]]]:
        context = req.prompt + choice.token_ids
        h = (sum(context[-4:]) * 1000003 + len(context) * 7919) % 1000033
        if req.params.greedy:
            token = self._eos if h % 23 == 0 else self._plain[h % len(self._plain)]
        else:
            rng = choice.rng or random.Random()
            token = self._eos if rng.random() < 0.02 else rng.choice(self._plain)
        lp = -0.25 - (h % 7) / 10
        alts = [t for t in (self._plain[(h + 17 * k) % len(self._plain)] for k in range(1, 40)) if t != token]
        k = req.params.logprobs or 0
        top = ([(token, lp)] + [(t, lp - 1.0 - j) for j, t in enumerate(alts)])[:k]
        return token, lp, top

    def _decode(self, req: _Req) -> None:
        p = req.params
        outs = []
        for c in req.choices:
            if c.finish_reason is not None:
                continue
            token, lp, top = self._next(req, c)
            c.token_ids.append(token)
            new_ids, logprobs = [token], [TokenLogprob(token, lp, top)] if p.logprobs is not None else None
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=p.skip_special_tokens)
            if (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                c.finish_reason, c.stop_reason = "stop", (token if token in p.stop_token_ids else None)
            for s in p.stop:
                at = text.find(s, max(0, len(c.emitted_text) - len(s)))
                if c.finish_reason is None and at >= 0:
                    text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                    c.finish_reason, c.stop_reason = "stop", s
            if c.finish_reason is None and (len(c.token_ids) >= p.max_tokens
                                            or len(req.prompt) + len(c.token_ids) >= self.max_model_len):
                c.finish_reason = "length"
            if c.finish_reason is None:  # hold back what a stop string may still cut off (as vLLM does)
                text = text[:len(text) - max((len(s) - 1 for s in p.stop), default=0)]
            delta = text[len(c.emitted_text):] if len(text) > len(c.emitted_text) else ""
            c.emitted_text += delta
            outs.append(CompletionOutput(c.index, delta, new_ids, logprobs, c.finish_reason, c.stop_reason))
        first = not req.first_sent
        req.first_sent = True
        need = self._blocks_for(req)
        self.used_blocks += need - req.blocks
        req.blocks = need
        out = RequestOutput(req.request_id, outs, req.finished, self._generated(req),
                            queue_time_s=(req.scheduled_at - req.arrival) if first and req.scheduled_at else None)
        if first and p.prompt_logprobs is not None:
            out.prompt_logprobs = [None] + [TokenLogprob(t, -1.5, [(t, -1.5)][:p.prompt_logprobs])
                                            for t in req.prompt[1:]]
        req.queue.put_nowait(out)
        if req.finished:
            self._free(req)


# -- servers --------------------------------------------------------------------------------------------------------
def wait_until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond()` until it holds; fail after `timeout` seconds. Tests wait on a state, never for a time."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not met after {timeout} s"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(base_url + "/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout} s")


class ServerThread:
    """The real app and DrainingServer around a (fake) engine, in a thread of this process."""

    def __init__(self, engine: Any, model_dir: Path, **settings: Any) -> None:
        import uvicorn

        from service.api.app import build_app
        from service.server import DrainingServer
        from service.settings import Settings

        self.port = free_port()
        self.settings = Settings(model=model_dir, port=self.port, **settings)
        self.engine = engine
        self.app = build_app(self.settings, engine, model_dir, self.settings.model_name(model_dir))
        self.ctx = self.app.state.ctx
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on",
                                access_log=False, timeout_graceful_shutdown=5)
        self.server = DrainingServer(config, self.ctx, self.settings.shutdown_timeout)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        wait_ready(self.base_url, timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)

    def in_loop(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the server's event loop and wait for it (asyncio objects are not thread-safe)."""
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self.engine._task.get_loop().call_soon_threadsafe(run)
        assert done.wait(10)


class ServerProcess:
    """`python -m <module> <args>` on a free port, output to a log file; SIGTERM to stop."""

    def __init__(self, args: list[str], log_path: Path, module: str = "service", env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", module, "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        if CURRENT_TEST is not None and CURRENT_TEST.get_closest_marker("server") is None:
            raise RuntimeError(f"{CURRENT_TEST.nodeid} starts a server process: mark it `pytest.mark.server` "
                               "(make test-fast deselects those)")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_ready(self.base_url, self.ready_timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server did not start:\n{self.log()}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# -- SSE ------------------------------------------------------------------------------------------------------------
def sse_data(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, asserting the exact `data: ...\\n\\n` framing."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    for e in events:
        assert e.startswith("data: "), e
    return [e[len("data: "):] for e in events]


def check_stream(events: list[str], n: int, obj: str, usage: bool) -> list[dict]:
    """The SSE contract (docs/ARCHITECTURE.md, "Streams"): one id, [DONE] once and last, one finish_reason per
    choice, usage chunk last."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == obj for c in chunks)
    body = chunks[:-1] if usage else chunks
    finishes: dict[int, list[str]] = {}
    for c in body:
        assert c["choices"], c
        for ch in c["choices"]:
            if ch["finish_reason"] is not None:
                finishes.setdefault(ch["index"], []).append(ch["finish_reason"])
    assert sorted(finishes) == list(range(n)), finishes
    assert all(len(v) == 1 and v[0] in ("stop", "length") for v in finishes.values()), finishes
    if usage:
        last = chunks[-1]
        assert last["choices"] == [] and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                                "prompt_tokens_details"}
    else:
        assert all("usage" not in c for c in chunks)
    return chunks


def main(argv: list[str] | None = None) -> int:
    """A fake-engine server process (same CLI flags as glm-serve)."""
    from service.cli import serve
    from service.logging_setup import configure_logging
    from service.settings import parse_settings

    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    model_dir = settings.model_dir()
    step_s = float(os.environ.get("FAKE_ENGINE_STEP_S", "0.002"))
    engine = FakeAsyncEngine(model_dir, max_num_seqs=settings.max_num_seqs, step_s=step_s)
    return serve(settings, engine, model_dir, settings.model_name(model_dir))


if __name__ == "__main__":
    raise SystemExit(main())
