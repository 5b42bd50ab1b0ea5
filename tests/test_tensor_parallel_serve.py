"""`glm-serve --tensor-parallel-size 2` as a real process (engine process = rank 0, which spawns rank 1), driven by
the openai SDK: the same greedy tokens as one rank over HTTP; and a rank killed mid-stream ends the stream with an
error event and `[DONE]`, turns /health to 503 within 10 s, and leaves no rank behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests import engine_fixtures
from tests.service_fixtures import ServerProcess, free_port, sse_data

pytestmark = [pytest.mark.slow, pytest.mark.server]
ARGS = ["--device", "cpu", "--kv-cache-tokens", "4096", "--block-size", "4", "--torch-threads", "1",
        "--num-speculative-tokens", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return engine_fixtures.make_checkpoint(tmp_path_factory.mktemp("tp_serve") / "tiny-tp", seed=8)


def _ranks(ckpt: Path) -> list[int]:
    """Pids of this checkpoint's headless tensor-parallel ranks (found by their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "service.engine.parallel_executor" in cmd and str(ckpt) in cmd:
                pids.append(int(entry.name))
    return pids


def _completions(base_url: str) -> list[list[str]]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    prompts = engine_fixtures.prompts(3, [6, 19, 30], seed=4)
    out = []
    for p in prompts:
        r = client.completions.create(model="tiny-tp", prompt=p, max_tokens=32, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        out.append(r.choices[0].logprobs.tokens)
    r = client.completions.create(model="tiny-tp", prompt=prompts[0], max_tokens=16, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    out.append([c.text for c in r.choices])
    return out


def test_http_tensor_parallel_2_equals_one_rank(ckpt, tmp_path):
    with ServerProcess(["--model", str(ckpt), *ARGS], tmp_path / "tp1.log") as one:
        want = _completions(one.base_url)
    with ServerProcess(["--model", str(ckpt), *ARGS, "-tp", "2"], tmp_path / "tp2.log", ready_timeout=400) as two:
        assert len(_ranks(ckpt)) == 1
        got = _completions(two.base_url)
        assert httpx.get(two.base_url + "/health").status_code == 200
    assert got == want and all(len(t) == 32 for t in want[:3])
    # Two "nodes" on this host: node 0 serves and runs rank 0, node 1 is a headless glm-serve running rank 1.
    port = str(free_port())
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port, "-tp", "2"]
    log1 = tmp_path / "node1.log"
    with log1.open("w") as out:
        node1 = subprocess.Popen([sys.executable, "-m", "service", "--model", str(ckpt), *ARGS, *nodes,
                                  "--node-rank", "1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        with ServerProcess(["--model", str(ckpt), *ARGS, *nodes], tmp_path / "node0.log", ready_timeout=400) as node0:
            assert _completions(node0.base_url) == want
        assert node1.wait(30) == 0, log1.read_text()  # rank 0 stopped it
    finally:
        if node1.poll() is None:
            node1.kill()
    deadline = time.monotonic() + 15
    while _ranks(ckpt) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks(ckpt), "a tensor-parallel rank outlived its server"


def test_killed_rank_fails_the_stream_and_health(ckpt, tmp_path):
    with ServerProcess(["--model", str(ckpt), *ARGS, "-tp", "2"], tmp_path / "kill.log", ready_timeout=400) as s:
        [rank1] = _ranks(ckpt)
        body = {"model": "tiny-tp", "prompt": "hello world", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", s.base_url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            raw = ""
            for chunk in r.iter_text():
                raw += chunk
                if not events and raw.count("data: ") >= 3:  # mid-stream
                    events.append("killed")
                    os.kill(rank1, signal.SIGKILL)
                    killed_at = time.monotonic()
        data = sse_data(raw)
        assert events and data[-1] == "[DONE]" and data.count("[DONE]") == 1
        assert "error" in json.loads(data[-2]), data[-2]
        while httpx.get(s.base_url + "/health").status_code != 503:
            assert time.monotonic() - killed_at < 10, "/health still 200 10 s after a rank died"
            time.sleep(0.1)
        refused = httpx.post(s.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
    assert not _ranks(ckpt)
