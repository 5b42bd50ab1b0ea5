"""The service's interface: EngineClient.generate / abort / cancellation, faults, a dead loop, an idle loop."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.client import EngineClient, EngineDeadError
from service.engine.config import EngineConfig
from tests.engine_fixtures import (  # noqa: F401
    collect,
    engine_ckpt_fixture,
    greedy,
    make_engine,
    one_torch_thread,
    prompts,
    run_engine,
    until,
)

PROMPTS = prompts(8, [5, 17, 9, 30], seed=4)


def new_engine(path) -> EngineClient:
    """An in-thread EngineClient whose `finished` maps request id -> finish reasons, as the loop saw them."""
    engine = EngineClient.in_thread(EngineConfig(model=path, device="cpu", dtype="float32", kv_cache_tokens=4096,
                                                  block_size=4))
    engine.finished = {}
    step = engine.local_engine.step

    def recording_step() -> list:
        outs = step()
        for o in outs:
            if o.finished:
                engine.finished[o.request_id] = [c.finish_reason for c in o.outputs]
        return outs

    engine.local_engine.step = recording_step
    return engine


def idle_and_empty(engine: EngineClient) -> bool:
    s = engine.stats()
    return engine.num_unfinished() == 0 and s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0


def test_generate_streams_what_the_sync_engine_computes(engine_ckpt) -> None:
    sync = make_engine(engine_ckpt)
    for i, p in enumerate(PROMPTS):
        sync.add_request(str(i), p, greedy(10, n=1 + i % 2))
    expected = run_engine(sync)

    async def main() -> None:
        engine = new_engine(engine_ckpt)
        assert engine.tokenizer is not None and engine.max_model_len == 256
        assert engine.model_config.vocab_size == 320 and engine.engine_config.block_size == 4
        await engine.start()
        streams = await asyncio.gather(*(collect(engine, str(i), p, greedy(10, n=1 + i % 2))
                                          for i, p in enumerate(PROMPTS)))
        for i, outs in enumerate(streams):
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            assert outs[0].queue_time_s is not None and all(o.queue_time_s is None for o in outs[1:])
            for index, choice in expected[str(i)].items():
                assert [t for o in outs for c in o.outputs if c.index == index for t in c.token_ids] == choice.token_ids
            assert outs[-1].num_generated_tokens == 10 * (1 + i % 2)
        await until(lambda: idle_and_empty(engine))
        await engine.shutdown()

    asyncio.run(main())


def test_leaving_the_stream_aborts_and_frees(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)
        await engine.start()

        async def leave_after(rid: str, n: int) -> int:
            got = 0
            async for _ in engine.generate(rid, PROMPTS[1], greedy(200)):
                got += 1
                if got == n:
                    break  # like a client that disconnects
            return got

        cancelled = asyncio.create_task(collect(engine, "cancelled", PROMPTS[2], greedy(200)))
        finisher = asyncio.create_task(collect(engine, "finisher", PROMPTS[0], greedy(30)))
        assert await leave_after("broke", 2) == 2
        await until(lambda: engine.stats().num_running >= 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        outs = await finisher
        assert outs[-1].outputs[-1].finish_reason == "length" and outs[-1].num_generated_tokens == 30
        await until(lambda: idle_and_empty(engine))
        assert engine.finished["broke"] == ["abort"] and engine.finished["cancelled"] == ["abort"]
        assert engine.local_engine.block_manager.num_free_blocks == engine.local_engine.block_manager.num_blocks
        await engine.shutdown()

    asyncio.run(main())


def test_abort_ends_the_stream_with_abort(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)
        await engine.start()
        outs = []
        async for out in engine.generate("a", PROMPTS[0], greedy(200, n=2)):
            outs.append(out)
            if len(outs) == 1:
                await engine.abort("a")
        assert outs[-1].finished and {c.finish_reason for c in outs[-1].outputs} == {"abort"}
        assert sorted(c.index for c in outs[-1].outputs) == [0, 1]
        assert outs[-1].num_generated_tokens < 400
        await until(lambda: idle_and_empty(engine))
        await engine.shutdown()

    asyncio.run(main())


def test_invalid_requests_raise_before_queueing(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)
        await engine.start()
        for prompt, params in [([], greedy(4)), ([1, 320], greedy(4)), ([1] * 250, greedy(10))]:
            with pytest.raises(ValueError):
                engine.generate("bad", prompt, params)
        stream = engine.generate("dup", PROMPTS[0], greedy(50))
        first = await anext(stream)
        with pytest.raises(ValueError, match="already in use"):
            engine.generate("dup", PROMPTS[0], greedy(4))
        await stream.aclose()
        assert first.request_id == "dup"
        await until(lambda: idle_and_empty(engine))
        assert engine.finished == {"dup": ["abort"]}
        await engine.shutdown()

    asyncio.run(main())


def test_a_step_fault_fails_its_request_and_the_engine_keeps_serving(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)
        await engine.start()
        faults = []

        def once(sched) -> None:
            if not faults:
                faults.append(1)
                raise RuntimeError("injected fault")

        engine.fault_injector = once
        outs = await collect(engine, "x", PROMPTS[0], greedy(5, n=2))
        assert len(outs) == 1 and outs[0].finished and "injected fault" in outs[0].error
        assert [c.finish_reason for c in outs[0].outputs] == ["error", "error"]
        assert engine.is_alive
        outs = await collect(engine, "y", PROMPTS[0], greedy(5))
        assert outs[-1].error is None and outs[-1].num_generated_tokens == 5
        await until(lambda: idle_and_empty(engine))
        await engine.shutdown()

    asyncio.run(main())


def test_a_dead_loop_says_so(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)

        def broken() -> list:
            raise MemoryError("cannot continue")

        engine.local_engine.step = broken  # an error outside the step's own handling kills the loop
        await engine.start()
        outs = await collect(engine, "x", PROMPTS[0], greedy(5))
        assert outs[-1].finished and "cannot continue" in outs[-1].error
        await until(lambda: not engine.is_alive)
        assert "MemoryError" in engine.dead_reason
        with pytest.raises(EngineDeadError):
            engine.generate("y", PROMPTS[0], greedy(5))
        await engine.shutdown()

    asyncio.run(main())


def test_the_loop_sleeps_when_idle(engine_ckpt) -> None:
    async def main() -> None:
        engine = new_engine(engine_ckpt)
        steps = []
        step = engine.local_engine.step
        engine.local_engine.step = lambda: steps.append(1) or step()
        await engine.start()
        await collect(engine, "x", PROMPTS[0], greedy(5))
        await until(lambda: idle_and_empty(engine))
        before = len(steps)
        await asyncio.sleep(0.3)
        assert len(steps) == before  # no busy loop
        outs = await collect(engine, "y", PROMPTS[1], greedy(3))  # and it wakes up for new work
        assert outs[-1].num_generated_tokens == 3
        await engine.shutdown()
        assert engine.transport._thread is None

    asyncio.run(main())
