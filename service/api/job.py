"""One HTTP generation request from admission to the last byte: its ticket, its engine requests, its cleanup.

A route reads top to bottom:

    async with Job(ctx, request) as job:            # admit (503 when full, draining or dead)
        ids = await ctx.encode(...)                 # render and encode
        stream = job.submit(request_id, ids, params)  # submit to the engine
        if streaming:
            return await job.stream(chunks(job.outputs()))  # SSE: the job closes when the response ends
        result = await job.collect(stream)          # JSON

Every error is raised (an APIError, or ClientDisconnected); leaving the `async with` closes the job unless it
was handed to an SSE response, whose own cleanup closes it once the stream has been sent or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
from fastapi import Request

from service.api.context import ServingContext
from service.api.errors import ClientDisconnected
from service.api.generation import Collected, EngineFault, Outputs, RequestStream, collect, engine_dead
from service.api.streaming import SSEResponse, sse_events
from service.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Job:
    def __init__(self, ctx: ServingContext, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self._streams: list[RequestStream] = []
        self._outputs: Outputs | None = None
        self._handed_off = self._closed = False
        timeout = ctx.settings.request_timeout
        self._deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        self._ticket = ctx.admit()

    async def __aenter__(self) -> Job:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._handed_off:
            await self.close()

    # -- submit ------------------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        stream = RequestStream(self.ctx, request_id, prompt_ids, params, self._ticket, self._deadline)
        self._streams.append(stream)
        return stream

    def outputs(self) -> Outputs:
        """The submitted requests' outputs as they come, tagged with the request's index (for streaming)."""
        self._outputs = Outputs(self._streams)
        return self._outputs

    # -- answer ------------------------------------------------------------------------------------------------
    async def collect(self) -> list[Collected]:
        """Every submitted request run to the end (a JSON response)."""
        return await self._wait(asyncio.gather(*(collect(s) for s in self._streams)))

    async def stream(self, chunks: AsyncGenerator[dict[str, Any], None],
                     framing: Callable[[AsyncGenerator[dict[str, Any], None]], AsyncGenerator[str, None]] = sse_events,
                     ) -> SSEResponse:
        """An SSE response of `chunks`, made from `outputs()` and framed by `framing` (OpenAI chat's `data:` lines
        and `[DONE]` unless told). The first output is awaited here: a request that fails before it gets an HTTP
        status, not an error event."""
        if self._outputs is None:
            raise RuntimeError("Job.stream needs the chunks of Job.outputs()")
        await self._wait(self._outputs.wait_first())
        self._handed_off = True
        return SSEResponse(framing(chunks), on_close=self.close)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._outputs is not None:  # first: it owns the tasks that iterate the streams
                await self._outputs.aclose()
            for stream in self._streams:
                await stream.aclose()
        self._ticket.release()

    # -- logging -----------------------------------------------------------------------------------------------
    def log_done(self, response_id: str, prompt_tokens: int, completion_tokens: int, reasons: list[str]) -> None:
        log.info("completed", extra={"fields": {"id": response_id, "prompt_tokens": prompt_tokens,
                                                "completion_tokens": completion_tokens,
                                                "finish_reasons": ",".join(reasons)}})

    def log_prompt(self, response_id: str, prompt: Any) -> None:
        if self.ctx.settings.log_prompts:
            log.info("prompt", extra={"fields": {"id": response_id, "prompt": prompt}})

    async def _wait(self, awaitable: Awaitable[T]) -> T:
        """Await engine work, or raise ClientDisconnected (cancelling it) if the client hangs up first."""
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise ClientDisconnected()
        try:
            return task.result()
        except EngineFault:
            if not self.ctx.engine.is_alive:  # before any byte was sent: say the replica is gone
                raise engine_dead(self.ctx) from None
            raise


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
