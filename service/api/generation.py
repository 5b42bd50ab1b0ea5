"""Driving engine requests from a route: metrics, admission tickets, timeouts, aborts, disconnects.

`track` wraps `engine.generate` so that however a request ends (finished, engine fault, timeout, client gone,
route error), its engine request is aborted unless it finished, its metrics are recorded once, and it leaves
the in-flight set. Cleanup awaits run shielded: Starlette cancels a disconnected stream's task through an
anyio cancel scope, which would otherwise cancel the abort itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request

from service.api.context import ServingContext
from service.api.errors import APIError, bad_request, redact
from service.engine.outputs import RequestOutput, TokenLogprob
from service.engine.sampling_params import SamplingParams
from service.queue import Ticket

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineFault(Exception):
    """The engine failed this request (RequestOutput.error); a server-side 500, not the client's fault."""


class ClientDisconnected(Exception):
    pass


def timeout_error(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s (--request-timeout) and was aborted.",
                    code="request_timeout")


def engine_dead(ctx: ServingContext) -> APIError:
    return APIError(503, f"The engine has stopped ({redact(ctx.engine.dead_reason)}); this replica cannot serve.",
                    code="engine_dead", headers={"Retry-After": str(ctx.settings.retry_after)})


async def track(ctx: ServingContext, request_id: str, prompt_ids: list[int], params: SamplingParams,
                ticket: Ticket, deadline: float | None) -> AsyncIterator[RequestOutput]:
    recorder = ctx.metrics.recorder()
    reasons: dict[int, str] = {}
    finished = rejected = False
    try:
        gen = ctx.engine.generate(request_id, prompt_ids, params)
    except ValueError as e:
        raise bad_request(str(e)) from None
    except Exception:
        if not ctx.engine.is_alive:  # EngineDeadError: it died between admission and now
            raise engine_dead(ctx) from None
        raise
    ctx.inflight.add(request_id)
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    out = await anext(gen)
            except StopAsyncIteration:
                break
            except ValueError as e:
                if recorder.first is not None:
                    raise
                rejected = True  # refused before queueing: the client's request is invalid
                raise bad_request(str(e)) from None
            except TimeoutError:
                raise timeout_error(ctx.settings.request_timeout or 0.0) from None
            except Exception:
                if recorder.first is None and not ctx.engine.is_alive:
                    rejected = True
                    raise engine_dead(ctx) from None
                raise
            ticket.started()
            recorder.on_output(out)
            for choice in out.outputs:
                if choice.finish_reason is not None:
                    reasons.setdefault(choice.index, choice.finish_reason)
            if out.error is not None:
                finished = True  # the engine already ended it
                raise EngineFault(out.error)
            finished = out.finished
            yield out
            if finished:
                break
    finally:
        ctx.inflight.discard(request_id)
        if not finished:
            with anyio.CancelScope(shield=True):
                aclose = getattr(gen, "aclose", None)
                with contextlib.suppress(Exception):
                    if aclose is not None:
                        await aclose()
                    await ctx.engine.abort(request_id)
        if not rejected:
            recorder.finish([reasons.get(i, "abort") for i in range(params.n)])


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None, False))
        except Exception as e:
            await queue.put((i, None, e, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Collected:
    prompt_token_ids: list[int]
    choices: list[ChoiceResult]
    num_generated_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0


async def collect(stream: AsyncIterator[RequestOutput], n: int) -> Collected:
    """Run one engine request to the end and join its deltas per choice (non-streaming responses)."""
    result: Collected | None = None
    async for out in stream:
        if result is None:
            result = Collected(list(out.prompt_token_ids), [ChoiceResult() for _ in range(n)])
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.num_generated_tokens = out.num_generated_tokens
        result.num_cached_tokens = out.num_cached_tokens
        for o in out.outputs:
            c = result.choices[o.index]
            c.text += o.text
            c.token_ids.extend(o.token_ids)
            if o.logprobs:
                c.logprobs.extend(o.logprobs)
            if o.finish_reason is not None and c.finish_reason is None:
                c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
    if result is None:
        raise EngineFault("the engine returned no output")
    return result


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, but cancel it (aborting its engine requests) if the client hangs up first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
