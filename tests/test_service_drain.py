"""Shutdown edge cases on a real process (fake engine, so streams are slow on purpose): a drain that hits
--shutdown-timeout aborts what is left and still exits 0; a second signal exits at once; --log-prompts."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.service_fixtures import ServerProcess, sse_data, wait_until

pytestmark = pytest.mark.server
SLOW = {"FAKE_ENGINE_STEP_S": "0.02"}  # 50 tokens/s: a 200-token stream takes 4 s
LONG = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "ignore_eos": True, "stream": True}


def start_stream(url: str) -> tuple[threading.Thread, list[str], threading.Event]:
    events: list[str] = []
    started = threading.Event()

    def run() -> None:
        buf = ""
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=LONG, timeout=60) as r:
                for piece in r.iter_text():
                    buf += piece
                    started.set()
        except httpx.HTTPError:
            pass  # a forced exit may cut the connection
        events.extend(sse_data(buf) if buf.endswith("\n\n") else ["<cut>"])

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    return thread, events, started


def test_drain_timeout_aborts_leftovers_and_exits_0(tmp_path, fake_model_dir):
    model = str(fake_model_dir)
    with ServerProcess(["--model", model, "--shutdown-timeout", "0.5", "--log-prompts"], tmp_path / "log",
                       module="tests.service_fixtures", env=SLOW) as s:
        marker = "pelican-marker-4410"
        r = httpx.post(s.base_url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": marker}], "max_tokens": 2})
        assert r.status_code == 200
        thread, events, _ = start_stream(s.base_url)
        s.terminate()
        thread.join(30)
        assert s.proc.wait(30) == 0
        assert events[-1] == "[DONE]"  # the stream was cut by the drain timeout: it ends aborted, not complete
        reasons = [ch["finish_reason"] for e in events[:-1] for ch in json.loads(e)["choices"] if ch["finish_reason"]]
        assert reasons == ["abort"]
        log = s.log()
        assert "drain timeout" in log and marker in log  # --log-prompts puts prompts in the log


def test_second_signal_exits_immediately(tmp_path, fake_model_dir):
    model = str(fake_model_dir)
    with ServerProcess(["--model", model, "--shutdown-timeout", "60"], tmp_path / "log",
                       module="tests.service_fixtures", env=SLOW) as s:
        thread, _, _ = start_stream(s.base_url)
        s.terminate()
        wait_until(lambda: httpx.get(s.base_url + "/ready").status_code == 503, what="draining after SIGTERM")
        assert s.proc.poll() is None  # draining: waiting for the stream
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(10) == 0  # well before the 60 s drain would have ended
        thread.join(30)
