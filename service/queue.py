"""Bounded admission: how many requests may wait for their first token before new ones get 503.

A request holds a Ticket from admission until its response is fully sent. It counts as *waiting* until the
engine hands back its first output (it is queued, templated, tokenized or prefilling), then as running.
The check and the count happen together, synchronously on the event loop, before any tokenizing or
templating (vLLM #58192: checking before the expensive work but counting after lets bursts through).
Draining (SIGTERM) rejects everything new and lets `wait_idle` tell when the last ticket is returned.
"""

from __future__ import annotations

import asyncio


class AdmissionRejected(Exception):
    """Why a request was turned away: `reason` is the admission_rejections_total label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Ticket:
    """One admitted request. `started()` and `release()` are idempotent so every exit path may call them."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self._queue = queue
        self.waiting = True
        self.released = False

    def started(self) -> None:
        if self.waiting and not self.released:
            self.waiting = False
            self._queue._on_started()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._queue._on_released(was_waiting=self.waiting)
            self.waiting = False


class AdmissionQueue:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0  # admitted, no first output yet
        self.active = 0  # admitted, response not finished (waiting included)
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> Ticket:
        if self.draining:
            raise AdmissionRejected("draining", "The server is shutting down; retry on another replica.")
        if self.waiting >= self.max_waiting:
            raise AdmissionRejected("queue_full", f"The request queue is full ({self.max_waiting} requests "
                                                  "waiting); retry later.")
        self.waiting += 1
        self.active += 1
        self._idle.clear()
        return Ticket(self)

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """True once no request is active; False if `timeout` seconds pass first."""
        if self._idle.is_set():  # wait_for(..., 0) would time out even on a set event
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _on_started(self) -> None:
        self.waiting -= 1

    def _on_released(self, was_waiting: bool) -> None:
        if was_waiting:
            self.waiting -= 1
        self.active -= 1
        if self.active == 0:
            self._idle.set()
