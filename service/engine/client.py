"""The service's one interface to the engine: `Engine` (what routes use) and `EngineClient` (its implementation).

The sync `LLMEngine` runs one command loop, `serve_commands`, on a transport (transports.py): a thread of
this process, or a child process (the default: there the model's per-step Python does not share the GIL with
the HTTP event loop). Requests and aborts go to the loop as commands; once per step the transport hands the
step's outputs to `EngineClient._publish`, which passes each request's outputs to its stream with one wake-up
of the event loop per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .config import EngineConfig
from .output_processor import RequestDetokenizer, eos_token_ids
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .sampling_params import SamplingParams, validate_request

if TYPE_CHECKING:  # torch and the model load only with an engine, not for `glm-serve --help` or a bad flag
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer

    from .engine import LLMEngine
    from .scheduler import SchedulerOutput
    from .transports import ProcessTransport, ThreadTransport

log = logging.getLogger("glm_serve.engine")

# ("add", (request_id, prompt_token_ids, params)) | ("abort", (request_id,)) | ("finish", (request_id, index))
Command = tuple[str, tuple]
# Called by a transport's thread once per step: outputs, stats, requests the engine refused (id, reason).
Publish = Callable[[list[RequestOutput], EngineStats, list[tuple[str, str]]], None]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing more will be served (the service answers /health with 503)."""


class OutputStream(Protocol):
    """One request's delta outputs, the last with finished=True; `aclose()` before that aborts the request."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    """What the service needs from an engine (EngineClient; the API tests use a fake with this shape)."""

    tokenizer: Tokenizer | None
    model_config: ModelConfig
    max_model_len: int
    engine_config: EngineConfig
    is_alive: bool
    dead_reason: str | None

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> OutputStream: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


def serve_commands(engine: LLMEngine, take: Callable[[bool], list[Command] | None], publish: Publish) -> None:
    """The engine's loop, whatever the transport: take commands (waiting for one only when idle), apply them,
    step, publish. Returns when `take` answers None (stop)."""
    while True:
        commands = take(not engine.has_unfinished())
        if commands is None:
            return
        refused: list[tuple[str, str]] = []
        for kind, args in commands:
            if kind == "abort":
                engine.abort_request(*args)
                continue
            if kind == "finish":  # a stop string the API process found (output_processor.py)
                engine.finish_choice(*args)
                continue
            try:
                engine.add_request(*args)
            except ValueError as e:  # checked at generate(); only a race (a reused id) can get here
                refused.append((args[0], str(e)))
        outputs = engine.step() if engine.has_unfinished() else []
        publish(outputs, engine.stats(), refused)


@dataclass
class _Slot:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    n: int


class _Stream:
    """EngineClient's OutputStream. A consumer that stops early (aclose, or drops the stream after a break or a
    cancellation) aborts the request; its blocks are freed at the next step."""

    def __init__(self, client: EngineClient, request_id: str, queue: asyncio.Queue[RequestOutput],
                 text: RequestDetokenizer | None) -> None:
        self._client, self._request_id, self._queue = client, request_id, queue
        self._text = text  # the engine sends token ids only: text and stop strings are done here
        self._done = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while True:
            out = await self._queue.get()
            if self._text is None:
                break
            for index in self._text.process(out):
                self._client.transport.send(("finish", (self._request_id, index)))
            if out.outputs or out.finished:
                break  # else only tokens past a stop string: nothing to show
        if out.finished:
            self._end(abort=False)
        return out

    async def aclose(self) -> None:
        self._end(abort=True)

    def _end(self, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        self._client._slots.pop(self._request_id, None)
        if abort:
            self._client.transport.send(("abort", (self._request_id,)))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # an interpreter shutting down
            self._end(abort=True)


class EngineClient:
    """The engine behind a transport: `in_thread(config)` or `in_process(config)`. Call start() before serving."""

    def __init__(self, transport: ThreadTransport | ProcessTransport, config: EngineConfig) -> None:
        self.transport = transport
        info = transport.info
        self.engine_config = config
        self.model_config: ModelConfig = info.model_config
        self.max_model_len: int = info.max_model_len
        self.tokenizer: Tokenizer | None = info.tokenizer
        self.is_alive = True
        self.dead_reason: str | None = None
        self._stats = info.stats
        self._slots: dict[str, _Slot] = {}  # written on the event loop; the transport's thread only reads
        self._started = False
        self._eos = eos_token_ids(self.model_config, self.tokenizer)

    @classmethod
    def in_thread(cls, config: EngineConfig) -> EngineClient:
        """Load the model into this process; the loop runs in a thread (tests, --no-engine-process)."""
        from .engine import LLMEngine
        from .transports import ThreadTransport

        config = dataclasses.replace(config, detokenize=False)  # the streams do it (output_processor.py)
        return cls(ThreadTransport(LLMEngine.from_config(config)), config)

    @classmethod
    def in_process(cls, config: EngineConfig) -> EngineClient:
        """Load the model in a child process, which runs the loop; this process keeps the tokenizer, and
        detokenizes and checks stop strings off the engine's step (output_processor.py)."""
        from .transports import ProcessTransport

        config = dataclasses.replace(config, detokenize=False)
        return cls(ProcessTransport(config), config)

    @property
    def local_engine(self) -> LLMEngine | None:
        """The LLMEngine when it runs in this process (tests reach into it), else None."""
        return self.transport.local_engine

    @property
    def pid(self) -> int | None:
        """The engine's child process, if it has one (its memory is the model's; the server's RSS excludes it)."""
        return self.transport.pid

    @property
    def fault_injector(self) -> Callable[[SchedulerOutput], None] | None:
        """Test hook: called inside every step; an exception it raises fails that step's requests."""
        return self.local_engine.fault_injector if self.local_engine is not None else None

    @fault_injector.setter
    def fault_injector(self, fn: Callable[[SchedulerOutput], None] | None) -> None:
        if self.local_engine is None:
            raise NotImplementedError("fault injection reaches only an in-process engine (--no-engine-process)")
        self.local_engine.fault_injector = fn

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.transport.start(self._publish, self._die)

    async def shutdown(self) -> None:
        await self.transport.stop()
        self._deliver([self._failed(rid, "the engine was shut down") for rid in list(self._slots)])

    # -- requests ------------------------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> OutputStream:
        """Queue a request and stream its outputs. Raises now for one the engine cannot serve (ValueError) and
        when the loop has died (EngineDeadError)."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if request_id in self._slots:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                         self.engine_config.max_num_seqs, self.tokenizer is not None)
        slot = _Slot(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._slots[request_id] = slot
        self.transport.send(("add", (request_id, list(prompt_token_ids), params)))
        text = None
        if not self.engine_config.detokenize and self.tokenizer is not None:
            text = RequestDetokenizer(self.tokenizer, prompt_token_ids, params, self._eos)
        return _Stream(self, request_id, slot.queue, text)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" after the next step."""
        self.transport.send(("abort", (request_id,)))

    def stats(self) -> EngineStats:
        return self._stats

    def num_unfinished(self) -> int:
        """Requests whose stream is still open."""
        return len(self._slots)

    # -- from the transport's thread -----------------------------------------------------------------------------
    def _publish(self, outputs: list[RequestOutput], stats: EngineStats, refused: list[tuple[str, str]]) -> None:
        self._stats = stats
        self._deliver([self._failed(rid, reason) for rid, reason in refused] + outputs)

    def _die(self, reason: str) -> None:
        if not self.is_alive:  # a process core that reported its death then closes its pipe
            return
        self.is_alive = False
        self.dead_reason = reason
        log.error("engine loop died: %s", reason)
        self._deliver([self._failed(rid, f"the engine loop died: {reason}") for rid in list(self._slots)])

    def _failed(self, request_id: str, reason: str) -> RequestOutput:
        slot = self._slots.get(request_id)
        choices = [CompletionOutput(i, "", [], finish_reason="error") for i in range(slot.n if slot else 0)]
        return RequestOutput(request_id, choices, finished=True, error=reason)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop for all its streams' outputs (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]] = {}
        for out in outputs:
            slot = self._slots.get(out.request_id)
            if slot is not None:  # else the consumer has gone; its abort is on the way
                by_loop.setdefault(slot.loop, []).append((slot.queue, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the event loop is closed
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
