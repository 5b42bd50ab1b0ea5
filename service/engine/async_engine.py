"""The service's one interface to the engine: `generate()` streams, `abort()` stops, off the event loop.

The sync `LLMEngine` lives in one background thread that owns it completely: requests and aborts reach it
through an inbox, outputs come back through a per-request asyncio.Queue (`call_soon_threadsafe`). The thread
sleeps on a condition while there is no work. A thread, not a process: the model's time is spent in torch ops
that release the GIL, and the per-step Python work is small next to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import SchedulerOutput

log = logging.getLogger("glm_serve.engine")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing more will be served (the service answers /health with 503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    n: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = engine.max_model_len
        self.engine_config: EngineConfig = engine.config
        self.is_alive = True
        self.dead_reason: str | None = None
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, tuple]] = []  # ("add", args) | ("abort", (request_id,)), guarded by _cv
        self._streams: dict[str, _Stream] = {}  # touched only on the event loop; the thread only reads
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model (and tokenizer, if the checkpoint has one). Blocking: call before serving."""
        return cls(LLMEngine.from_config(config))

    @property
    def fault_injector(self) -> Callable[[SchedulerOutput], None] | None:
        """Test hook: called inside every step; an exception it raises fails that step's requests."""
        return self.engine.fault_injector

    @fault_injector.setter
    def fault_injector(self, fn: Callable[[SchedulerOutput], None] | None) -> None:
        self.engine.fault_injector = fn

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_streams("the engine was shut down")

    # -- requests ------------------------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                 ) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request; the last has finished=True.

        Checks the request now (ValueError for one the engine cannot serve, EngineDeadError if the loop died) and
        queues it when iteration starts. Leaving the iteration early (break, client disconnect, cancellation)
        aborts the request; its blocks are freed at the next step.
        """
        if not self.is_alive:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
        return self._generate(request_id, list(prompt_token_ids), params)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    async def _generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                        ) -> AsyncIterator[RequestOutput]:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), prompt_token_ids, params.n)
        self._streams[request_id] = stream
        finished = False
        try:
            self._submit("add", (request_id, prompt_token_ids, params))
            while True:
                out = await stream.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", (request_id,))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" after the next step."""
        self._submit("abort", (request_id,))

    def stats(self) -> EngineStats:
        return self._stats

    def num_unfinished(self) -> int:
        """Requests whose stream is still open."""
        return len(self._streams)

    # -- the loop thread -----------------------------------------------------------------------------------------
    def _submit(self, kind: str, args: tuple) -> None:
        with self._cv:
            self._inbox.append((kind, args))
            self._cv.notify()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._inbox or engine.has_unfinished()):
                        if not self._cv.wait(engine.idle_interval):
                            engine.heartbeat()  # tensor parallel: the other ranks wait for the next plan
                    if self._stop:
                        return
                    inbox, self._inbox = self._inbox, []
                for kind, args in inbox:
                    if kind == "abort":
                        engine.abort_request(*args)
                        continue
                    try:
                        engine.add_request(*args)
                    except ValueError as e:  # checked at generate(); only a race can get here
                        self._fail_stream(args[0], str(e))
                outputs = engine.step() if engine.has_unfinished() else []
                self._stats = engine.stats()
                self._deliver_all(outputs)
        except BaseException as e:
            self.is_alive = False
            self.dead_reason = f"{type(e).__name__}: {e}"
            log.exception("engine loop died")
            self._fail_streams(f"the engine loop died: {self.dead_reason}")
        finally:
            engine.close()  # tensor parallel: stop the other ranks

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step for all its streams' outputs (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # else the consumer has gone; its abort is on the way
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # the consumer has gone; its abort is on the way
        with contextlib.suppress(RuntimeError):  # RuntimeError: its event loop is closed
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_streams(self, reason: str) -> None:
        for request_id in list(self._streams):
            self._fail_stream(request_id, reason)

    def _fail_stream(self, request_id: str, reason: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            choices = [CompletionOutput(i, "", [], finish_reason="error") for i in range(stream.n)]
            self._deliver(RequestOutput(request_id, stream.prompt_token_ids, choices, finished=True, error=reason))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
