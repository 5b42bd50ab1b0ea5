"""One engine request as a route sees it: timeout, metrics, engine faults as API errors, one abort.

`RequestStream` iterates the engine client's outputs for one request. However the request ends (finished,
engine fault, timeout, client gone, route error), `aclose()` aborts it in the engine unless it finished,
records its metrics once, and takes it out of the in-flight set. Cleanup awaits run shielded: Starlette
cancels a disconnected stream's task through an anyio cancel scope, which would otherwise cancel the abort.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from service.api.context import ServingContext
from service.api.errors import APIError, bad_request, redact
from service.engine.client import EngineDeadError
from service.engine.outputs import RequestOutput, TokenLogprob
from service.engine.sampling_params import SamplingParams
from service.queue import Ticket

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineFault(APIError):
    """The engine failed this request (RequestOutput.error): a server-side 500, not the client's fault."""

    def __init__(self, reason: str) -> None:
        super().__init__(500, f"The engine failed while generating: {redact(reason)}", code="engine_error")


def timeout_error(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s (--request-timeout) and was aborted.",
                    code="request_timeout")


def engine_dead(ctx: ServingContext) -> APIError:
    return APIError(503, f"The engine has stopped ({redact(ctx.engine.dead_reason)}); this replica cannot serve.",
                    code="engine_dead", headers={"Retry-After": str(ctx.settings.retry_after)})


class RequestStream:
    """The outputs of one engine request, submitted at construction (400/503 if the engine refuses it)."""

    def __init__(self, ctx: ServingContext, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 ticket: Ticket, deadline: float | None) -> None:
        try:
            self._outputs = ctx.engine.generate(request_id, prompt_ids, params)
        except EngineDeadError:
            raise engine_dead(ctx) from None
        except ValueError as e:  # a request the engine cannot serve
            raise bad_request(str(e)) from None
        except Exception:
            if not ctx.engine.is_alive:  # it died between admission and now
                raise engine_dead(ctx) from None
            raise
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_ids)
        self.n = params.n
        self._ctx, self._ticket, self._deadline = ctx, ticket, deadline
        self._recorder = ctx.metrics.recorder(self.num_prompt_tokens)
        self._reasons: dict[int, str] = {}
        self._finished = self._closed = False
        ctx.inflight.add(request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout_at(self._deadline):
                out = await anext(self._outputs)
        except TimeoutError:
            raise timeout_error(self._ctx.settings.request_timeout or 0.0) from None
        self._ticket.started()
        self._recorder.on_output(out)
        self._finished = out.finished
        if out.error is not None:
            self._finished = True  # the engine already ended it
            for c in out.outputs:  # the fault ends every choice, including those that had already finished
                self._reasons.setdefault(c.index, "error")
            log.error("engine fault: %s", out.error)
            raise EngineFault(out.error)
        for c in out.outputs:
            if c.finish_reason is not None:  # the engine sends one per choice
                self._reasons[c.index] = c.finish_reason
        return out

    async def aclose(self) -> None:
        """Abort the engine request unless it finished; record its metrics. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ctx.inflight.discard(self.request_id)
        if not self._finished:
            with anyio.CancelScope(shield=True):
                try:
                    await self._outputs.aclose()  # the engine client aborts an unfinished request here
                except Exception:
                    log.exception("aborting request %s", self.request_id)
        self._recorder.finish([self._reasons.get(i, "abort") for i in range(self.n)])


class Outputs:
    """The outputs of a job's requests as they come, tagged with the request's index.

    `wait_first()` takes the first output early and hands it out again as the first item, so a route can
    decide its HTTP status before it starts streaming. Several requests are pumped by one task each into one
    queue; a single request is read directly (no task hop per output).
    """

    def __init__(self, streams: list[RequestStream]) -> None:
        self._streams = streams
        self._head: tuple[int, RequestOutput] | None = None
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)] \
            if len(streams) > 1 else []
        self._remaining = len(self._tasks)

    async def wait_first(self) -> None:
        if self._head is None:
            self._head = await self._next()

    def __aiter__(self) -> Outputs:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._head is not None:
            head, self._head = self._head, None
            return head
        return await self._next()

    async def _next(self) -> tuple[int, RequestOutput]:
        if not self._tasks:
            return 0, await anext(self._streams[0])
        while self._remaining:
            i, out, error = await self._queue.get()
            if error is not None:
                raise error
            if out is not None:
                return i, out
            self._remaining -= 1
        raise StopAsyncIteration

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await self._queue.put((i, out, None))
        except Exception as e:
            await self._queue.put((i, None, e))
            return
        await self._queue.put((i, None, None))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Collected:
    num_prompt_tokens: int
    choices: list[ChoiceResult]
    num_generated_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


async def collect(stream: RequestStream) -> Collected:
    """Run one engine request to the end and join its deltas per choice (non-streaming responses)."""
    result = Collected(stream.num_prompt_tokens, [ChoiceResult() for _ in range(stream.n)])
    async for out in stream:
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.num_generated_tokens = out.num_generated_tokens
        for o in out.outputs:
            c = result.choices[o.index]
            c.text += o.text
            c.token_ids.extend(o.token_ids)
            if o.logprobs:
                c.logprobs.extend(o.logprobs)
            if o.finish_reason is not None:
                c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
    return result
