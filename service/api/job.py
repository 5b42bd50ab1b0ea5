"""One HTTP generation request from admission to the last byte: its ticket, its engine streams, its cleanup.

Routes build a Job right after admission; every exit path ends in `close()` exactly once: directly for
JSON responses and errors, or from the SSE response's cleanup once the stream has been sent (or dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import Response

from service.api.context import ServingContext
from service.api.errors import APIError, bad_request, redact
from service.api.generation import ClientDisconnected, EngineFault, engine_dead, run_or_disconnect, track
from service.api.streaming import SSEResponse, sse_events
from service.engine.outputs import RequestOutput
from service.engine.sampling_params import SamplingParams
from service.logging_setup import request_id_var

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Job:
    def __init__(self, ctx: ServingContext, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self.ticket = ctx.admit()
        self.streams: list[AsyncIterator[RequestOutput]] = []
        self.closed = False
        timeout = ctx.settings.request_timeout
        self.deadline = asyncio.get_running_loop().time() + timeout if timeout else None

    def params(self, build: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return build()
        except ValueError as e:  # SamplingParams' own range checks, phrased "<field> must ..."
            raise bad_request(str(e), param=str(e).split(" ", 1)[0]) from None

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        stream = track(self.ctx, request_id, prompt_ids, params, self.ticket, self.deadline)
        self.streams.append(stream)
        return stream

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await engine work while watching for the client hanging up."""
        try:
            return await run_or_disconnect(self.request, awaitable)
        except EngineFault as e:
            log.error("engine fault: %s", e)
            if not self.ctx.engine.is_alive:
                raise engine_dead(self.ctx) from None
            raise APIError(500, f"The engine failed while generating: {redact(e)}", code="engine_error") from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            for stream in reversed(self.streams):  # a merge of streams first: it owns the tasks iterating them
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
        self.ticket.release()

    def log_done(self, response_id: str, prompt_tokens: int, completion_tokens: int, reasons: list[str]) -> None:
        log.info("completed", extra={"fields": {"id": response_id, "prompt_tokens": prompt_tokens,
                                                "completion_tokens": completion_tokens,
                                                "finish_reasons": ",".join(reasons)}})

    def log_prompt(self, response_id: str, prompt: Any) -> None:
        if self.ctx.settings.log_prompts:
            log.info("prompt", extra={"fields": {"id": response_id, "prompt": prompt}})


async def run_job(ctx: ServingContext, request: Request,
                  body: Callable[[Job], Awaitable[Response | AsyncIterator[dict[str, Any]]]]) -> Response:
    """Admit, run `body`, and return its JSON response or stream its chunks as SSE; clean up on every path."""
    job = Job(ctx, request)
    handed_off = False
    try:
        result = await body(job)
        if isinstance(result, Response):
            return result
        handed_off = True
        return SSEResponse(sse_events(result), on_close=job.close)
    except ClientDisconnected:
        log.info("client disconnected; request aborted", extra={"fields": {"request_id": request_id_var.get()}})
        return Response(status_code=499)
    finally:
        if not handed_off:
            await job.close()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}

