"""Where the engine's command loop (client.serve_commands) runs: a thread here, or a child process.

ThreadTransport: the `LLMEngine` lives in one thread that owns it; commands reach it through an inbox guarded
by a condition it sleeps on while idle. Enough when the model's time is spent in torch ops that release the GIL.

ProcessTransport (the default, vLLM V1's engine-core split): in one process the engine thread and the HTTP
event loop share the GIL, and a decode step of a small model is mostly Python, so every SSE chunk the loop
formats delays the step (bench/http_overhead.py at 16 streams on 2 cores: 26% fewer tokens/s than the engine
alone). The child owns the engine; the server keeps only the tokenizer. Wire: two one-way pipes of pickled
tuples. Server -> core: the commands, then ("stop", ()); a sender thread writes them so a full pipe never
blocks the event loop. Core -> server, once per step: ("step", outputs, stats, refused); ("dead", reason) if
the loop raised. The core ignores SIGINT/SIGTERM (the server drains, then stops it) and exits when the
server's pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from model.config import ModelConfig
from model.tokenizer import Tokenizer

from .client import Command, Publish, serve_commands
from .config import EngineConfig
from .engine import LLMEngine
from .outputs import EngineStats

log = logging.getLogger("glm_serve.engine")

STOP_TIMEOUT_S = 10.0
Die = Callable[[str], None]


@dataclass
class EngineInfo:
    """What the client learns from the loaded engine."""

    model_config: ModelConfig
    max_model_len: int
    tokenizer: Tokenizer | None
    stats: EngineStats


class ThreadTransport:
    pid: int | None = None

    def __init__(self, engine: LLMEngine) -> None:
        self.local_engine: LLMEngine | None = engine
        self.info = EngineInfo(engine.model_config, engine.max_model_len, engine.tokenizer, engine.stats())
        self._cv = threading.Condition()
        self._inbox: list[Command] = []  # guarded by _cv
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self, publish: Publish, die: Die) -> None:
        self._thread = threading.Thread(target=self._run, args=(publish, die), name="engine-loop", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        with self._cv:
            self._inbox.append(command)
            self._cv.notify()

    async def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _take(self, block: bool) -> list[Command] | None:
        with self._cv:
            while block and not (self._stop or self._inbox):
                self._cv.wait()
            if self._stop:
                return None
            inbox, self._inbox = self._inbox, []
            return inbox

    def _run(self, publish: Publish, die: Die) -> None:
        assert self.local_engine is not None
        try:
            serve_commands(self.local_engine, self._take, publish)
        except BaseException as e:
            log.exception("engine loop died")
            die(f"{type(e).__name__}: {e}")


def run_core(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    """The child's main: load the engine, report, then run the command loop on the pipes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine-core] %(message)s")
    try:
        engine = LLMEngine.from_config(config)
    except BaseException as e:  # reported to the server, which decides how to exit
        results.send(("error", f"{type(e).__name__}: {e}", isinstance(e, (OSError, ValueError))))
        return
    results.send(("ready", engine.model_config, engine.max_model_len, engine.stats()))

    def take(block: bool) -> list[Command] | None:
        if block:
            commands.poll(None)
        taken = []
        while commands.poll():
            command = commands.recv()
            if command[0] == "stop":
                return None
            taken.append(command)
        return taken

    try:
        serve_commands(engine, take, lambda outputs, stats, refused: results.send(("step", outputs, stats, refused)))
    except (EOFError, OSError):
        return  # the server has gone
    except BaseException as e:
        log.exception("engine loop died")
        results.send(("dead", f"{type(e).__name__}: {e}"))


class ProcessTransport:
    local_engine: LLMEngine | None = None

    def __init__(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the event loop's threads and locks
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._results, results_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=run_core, name="glm-serve-engine-core", daemon=True,
                                 args=(config, commands_in, results_out, logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        commands_in.close()  # the child's ends: closed here so a dead child reads as EOF
        results_out.close()
        try:
            msg = self._results.recv()
        except EOFError:
            self._proc.join()
            raise OSError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            self._proc.join()
            raise (ValueError if msg[2] else RuntimeError)(msg[1])
        _, model_config, max_model_len, stats = msg
        self.info = EngineInfo(model_config, max_model_len, Tokenizer.from_checkpoint(config.model), stats)
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()  # put() is safe in __del__
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self, publish: Publish, die: Die) -> None:
        self._threads = [threading.Thread(target=self._send_loop, name="engine-send", daemon=True),
                         threading.Thread(target=self._recv_loop, args=(publish, die), name="engine-recv",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, command: Command) -> None:
        self._outbox.put(command)

    async def stop(self) -> None:
        self._stopping = True
        if self._threads:
            self._outbox.put(("stop", ()))
            self._outbox.put(None)
        else:  # never started: no sender thread to pass the stop on
            with contextlib.suppress(OSError, ValueError):
                self._commands.send(("stop", ()))
        await asyncio.to_thread(self._proc.join, STOP_TIMEOUT_S)
        if self._proc.is_alive():
            log.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            self._proc.kill()  # not terminate(): the core ignores SIGTERM
            await asyncio.to_thread(self._proc.join)
        for t in self._threads:
            await asyncio.to_thread(t.join)
        self._threads = []

    def _send_loop(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._commands.send(command)
            except (OSError, ValueError):  # the core has gone; the reader reports it
                return

    def _recv_loop(self, publish: Publish, die: Die) -> None:
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                self._proc.join(STOP_TIMEOUT_S)
                if not self._stopping:
                    die(f"the engine process exited (exit code {self._proc.exitcode})")
                return
            if msg[0] == "step":
                publish(*msg[1:])
            elif msg[0] == "dead":
                die(msg[1])
