"""uvicorn with our own SIGTERM/SIGINT handling: drain, then exit 0.

Stock uvicorn shuts down at once on SIGTERM and re-raises the signal afterwards, so the process dies with -15
even after a clean shutdown. Here the first signal starts a drain instead: `/ready` turns 503 (the load
balancer stops sending), new requests get 503 + Retry-After, in-flight requests run to completion for up to
`--shutdown-timeout` seconds (then they are aborted), and only then does uvicorn close its sockets and the
process exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator

import uvicorn

from service.api.context import ServingContext

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ABORT_GRACE_S = 5.0  # after aborting leftovers, time for their streams to send finish_reason and [DONE]


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServingContext, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in SIGNALS:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests) or no support
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        # unlike uvicorn, no re-raising of the signal: a drained server exits 0

    def _on_signal(self, sig: int) -> None:
        if self._drain_task is None:
            log.info("received %s: draining", signal.Signals(sig).name,
                     extra={"fields": {"in_flight": self.ctx.queue.active, "timeout_s": self.shutdown_timeout}})
            self._drain_task = asyncio.get_running_loop().create_task(self.drain())
        else:
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True

    async def drain(self) -> None:
        """Stop admitting, let in-flight requests finish (or abort them at the deadline), then exit."""
        queue = self.ctx.queue
        queue.begin_drain()
        if not await queue.wait_idle(self.shutdown_timeout):
            log.warning("drain timeout: aborting in-flight requests", extra={"fields": {"in_flight": queue.active}})
            await self.ctx.abort_all()
            await queue.wait_idle(_ABORT_GRACE_S)
        log.info("drained; shutting down")
        self.should_exit = True
