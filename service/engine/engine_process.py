"""The engine in its own process (vLLM V1's engine-core split), behind the same interface as `AsyncEngine`.

In one process the engine thread and the HTTP event loop share the GIL, and a decode step of a small model is
mostly Python: every SSE chunk the loop formats delays the step, and the step delays the chunks (measured with
bench/http_overhead.py at 16 streams on 2 cores: 26% fewer tokens/s than the engine alone). Here the process
that serves HTTP holds only the tokenizer; the child owns the `LLMEngine` and the model.

Wire: two one-way pipes of pickled tuples. Front end -> core: ("add", (request_id, prompt_ids, params)),
("abort", (request_id,)), ("stop", ()); a sender thread writes them so a full pipe never blocks the event loop.
Core -> front end, once per step: ("step", outputs, stats, [(request_id, reason) refused]); ("dead", reason) if
the loop raised. A reader thread hands outputs to the streams exactly as the thread engine does. The core
ignores SIGINT/SIGTERM (the front end drains, then stops it) and exits when the front end's pipe closes, so it
never outlives the server.
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
from multiprocessing.connection import Connection
from pathlib import Path

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import LLMEngine, validate_request
from .sampling_params import SamplingParams
from .scheduler import SchedulerOutput

log = logging.getLogger("glm_serve.engine")

STOP_TIMEOUT_S = 10.0


def run_core(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    """The child's main: load the engine, then step while there is work, reading commands between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine-core] %(message)s")
    try:
        engine = LLMEngine.from_config(config)
    except BaseException as e:  # reported to the front end, which decides how to exit
        results.send(("error", f"{type(e).__name__}: {e}", isinstance(e, (OSError, ValueError))))
        return
    results.send(("ready", engine.model_config, engine.max_model_len, engine.stats()))
    try:
        while True:
            refused: list[tuple[str, str]] = []
            # Idle: block until a command comes. Busy: take whatever has arrived, then step.
            if not engine.has_unfinished():
                while not commands.poll(engine.idle_interval):
                    engine.heartbeat()  # tensor parallel: the other ranks wait for the next plan
            while commands.poll():
                kind, args = commands.recv()
                if kind == "stop":
                    return
                if kind == "abort":
                    engine.abort_request(*args)
                    continue
                try:
                    engine.add_request(*args)
                except ValueError as e:  # validated in the front end; only a race can get here
                    refused.append((args[0], str(e)))
            outputs = engine.step() if engine.has_unfinished() else []
            results.send(("step", outputs, engine.stats(), refused))
    except (EOFError, OSError, BrokenPipeError):
        return  # the front end has gone
    except BaseException as e:
        log.exception("engine loop died")
        results.send(("dead", f"{type(e).__name__}: {e}"))
    finally:
        engine.close()  # tensor parallel: stop the other ranks


class ProcessAsyncEngine(AsyncEngine):
    """`AsyncEngine` whose loop runs in a child process (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:  # not super().__init__: that one wants a local LLMEngine
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
        _, self.model_config, self.max_model_len, self._stats = msg
        self.engine_config = config
        self.tokenizer = None
        if (Path(config.model) / "tokenizer.json").is_file():
            from model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_dir(config.model)
        self.is_alive = True
        self.dead_reason: str | None = None
        self._streams = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, config: EngineConfig) -> ProcessAsyncEngine:
        return cls(config)

    @property
    def fault_injector(self) -> Callable[[SchedulerOutput], None] | None:
        return None

    @fault_injector.setter
    def fault_injector(self, fn: Callable[[SchedulerOutput], None] | None) -> None:
        raise NotImplementedError("fault injection reaches only an in-process engine (--no-engine-process)")

    @property
    def pid(self) -> int | None:
        """The engine process (its memory is the model's; the server's own RSS excludes it)."""
        return self._proc.pid

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                         self.engine_config.max_num_seqs, self.tokenizer is not None)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._send_loop, name="engine-send", daemon=True),
                             threading.Thread(target=self._recv_loop, name="engine-recv", daemon=True)]
            for t in self._threads:
                t.start()

    async def shutdown(self) -> None:
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
        self._fail_streams("the engine was shut down")

    # -- the pipes -----------------------------------------------------------------------------------------------
    def _submit(self, kind: str, args: tuple) -> None:
        self._outbox.put((kind, args))

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            try:
                self._commands.send(item)
            except (OSError, ValueError):  # the core has gone; the reader reports it
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                self._proc.join(STOP_TIMEOUT_S)
                if not self._stopping and self.is_alive:
                    self._die(f"the engine process exited (exit code {self._proc.exitcode})")
                return
            if msg[0] == "step":
                _, outputs, self._stats, refused = msg
                for request_id, reason in refused:
                    self._fail_stream(request_id, reason)
                self._deliver_all(outputs)
            elif msg[0] == "dead":
                self._die(msg[1])

    def _die(self, reason: str) -> None:
        self.is_alive = False
        self.dead_reason = reason
        log.error("engine loop died: %s", reason)
        self._fail_streams(f"the engine loop died: {reason}")


__all__ = ["ProcessAsyncEngine", "run_core"]
