"""The engine in its own process: same outputs as the sync engine, aborts free, refusals and load errors are
reported, a killed engine process is noticed (streams fail, /health turns dead), shutdown leaves no child."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from service.engine.client import EngineClient, EngineDeadError
from service.engine.config import EngineConfig
from tests.engine_fixtures import collect, greedy, make_engine, prompts, run_engine, until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = prompts(6, [5, 17, 9, 30], seed=7)


def config(path, **kw) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", dtype="float32", kv_cache_tokens=4096, block_size=4,
                        torch_threads=1, **kw)


def test_streams_equal_the_sync_engine_and_abort_frees(engine_ckpt) -> None:
    sync = make_engine(engine_ckpt)
    for i, p in enumerate(PROMPTS):
        sync.add_request(str(i), p, greedy(10, n=1 + i % 2))
    expected = run_engine(sync)
    text = expected["3"][0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    sync.add_request("stop", PROMPTS[3], greedy(10, stop=[stop]))
    stopped = run_engine(sync)["stop"][0]

    async def main() -> None:
        engine = EngineClient.in_process(config(engine_ckpt))
        assert engine.pid != os.getpid() and engine.tokenizer is not None
        assert engine.max_model_len == 256 and engine.model_config.vocab_size == 320
        await engine.start()
        streams = await asyncio.gather(*(collect(engine, str(i), p, greedy(10, n=1 + i % 2))
                                          for i, p in enumerate(PROMPTS)))
        for i, outs in enumerate(streams):
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            for index, choice in expected[str(i)].items():
                assert [t for o in outs for c in o.outputs if c.index == index for t in c.token_ids] == choice.token_ids
                assert "".join(c.text for o in outs for c in o.outputs if c.index == index) == choice.text
        # A stop string, found in this process (the engine sends token ids): cut where the sync engine cuts.
        outs = await collect(engine, "stop", PROMPTS[3], greedy(10, stop=[stop]))
        assert "".join(c.text for o in outs for c in o.outputs) == stopped.text and stopped.stop_reason == stop
        assert [t for o in outs for c in o.outputs for t in c.token_ids] == stopped.token_ids
        assert outs[-1].outputs[-1].stop_reason == stop and outs[-1].num_generated_tokens == len(stopped.token_ids)
        # Leaving a stream early aborts the request in the engine process; its blocks come back.
        gen = engine.generate("long", PROMPTS[0], greedy(200))
        first = await anext(gen)
        assert not first.finished
        await gen.aclose()
        await until(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0, timeout=20.0)
        # Refused here, before crossing the pipe, with the same message as the in-process engine.
        with pytest.raises(ValueError, match="maximum model length"):
            engine.generate("big", PROMPTS[0], greedy(1000))
        pid = engine.pid
        await engine.shutdown()
        assert not engine.transport._proc.is_alive()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    asyncio.run(main())


def test_a_killed_engine_process_fails_streams_and_refuses_new_requests(engine_ckpt) -> None:
    async def main() -> None:
        engine = EngineClient.in_process(config(engine_ckpt))
        await engine.start()
        gen = engine.generate("r", PROMPTS[1], greedy(200))
        await anext(gen)
        os.kill(engine.pid, signal.SIGKILL)  # an OOM kill, say
        rest = [out async for out in gen]
        assert rest[-1].finished and rest[-1].error is not None and "exited" in rest[-1].error
        await until(lambda: not engine.is_alive, timeout=20.0)
        assert "exit code -9" in engine.dead_reason
        with pytest.raises(EngineDeadError):
            engine.generate("s", PROMPTS[0], greedy(4))
        await engine.shutdown()

    asyncio.run(main())


def test_load_errors_reach_the_front_end(engine_ckpt, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in engine_ckpt.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] += 1  # the weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):
        EngineClient.in_process(config(bad))


def test_fault_injection_needs_the_in_process_engine(engine_ckpt) -> None:
    engine = EngineClient.in_process(config(engine_ckpt))
    try:
        assert engine.fault_injector is None
        with pytest.raises(NotImplementedError):
            engine.fault_injector = lambda sched: None
    finally:
        asyncio.run(engine.shutdown())


def test_the_engine_process_exits_when_the_server_goes(engine_ckpt) -> None:
    """A server killed outright closes its end of the command pipe: the engine process must not linger."""
    engine = EngineClient.in_process(config(engine_ckpt))
    engine.transport._commands.close()  # what the kernel does to a dead server's pipe ends
    engine.transport._proc.join(20)
    assert not engine.transport._proc.is_alive() and engine.transport._proc.exitcode == 0
