"""Server-sent events as OpenAI (and vLLM) frame them, or as named events (Anthropic's Messages API).

Each event is `data: {json}\\n\\n`; the stream always ends with `data: [DONE]\\n\\n`, also after an error,
which is sent as `data: {"error": {...}}` (clients cannot tell truncation from completion otherwise, vLLM
#52852). Named events are `event: TYPE\\ndata: {json}\\n\\n`, TYPE being the data's own `type`; they end with
the API's own last event (no `[DONE]`), and an error is one event in the API's error shape. The response runs
a cleanup callback however it ends, including when the client disconnects before the first byte (the body
generator then never starts, so its own `finally` would not run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.errors import APIError

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def error_event(err: APIError) -> str:
    return sse(err.body())


def named_sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\n" + sse(data)


async def sse_events(chunks: AsyncGenerator[dict[str, Any], None],
                     named_error: Callable[[APIError], dict[str, Any]] | None = None) -> AsyncGenerator[str, None]:
    """Frame `chunks` as SSE, turning a failure into an error event; `[DONE]` always comes last. With
    `named_error` (the error event's data), as named events instead, and without `[DONE]`."""
    frame = sse if named_error is None else named_sse
    try:
        async for chunk in chunks:
            yield frame(chunk)
    except Exception as e:
        if not isinstance(e, APIError):  # an APIError (EngineFault included) was logged where it was raised
            log.exception("error while streaming")
            e = APIError(500, "Internal server error while streaming; the server log has the details.")
        yield error_event(e) if named_error is None else named_sse(named_error(e))
    finally:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
    if named_error is None:
        yield DONE


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._on_close()
