"""The Responses API's stream: typed events, each framed `event: <type>\\ndata: <json>\\n\\n`, numbered by
`sequence_number`, with no `[DONE]` (OpenAI's framing).

`response.created` and `response.in_progress` first (the Response so far), then the events that build each
output item (`response.output_item.added`, `response.content_part.added`, `response.reasoning_text.delta` /
`response.output_text.delta` / `response.function_call_arguments.delta`, their `.done`, `response.output_item.done`),
then one of `response.completed`, `response.incomplete` (max_output_tokens) or `response.failed` with the whole
Response, which is what a non-streamed request returns. A failure after the stream started is an `error` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio

from service.api import chat_agents
from service.api.chat import ChatRun
from service.api.errors import APIError
from service.api.generation import Outputs
from service.api.job import Job
from service.api.responses_output import OutputBuilder, response_object, response_usage, status_of
from service.api.responses_protocol import ResponsesRequest

log = logging.getLogger(__name__)

_FINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}


def _frame(event: dict[str, Any], number: int) -> str:
    event["sequence_number"] = number
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


async def typed_events(events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[str, None]:
    """Frame `events` (dicts with a `type`), numbering them; a failure becomes an `error` event, the last."""
    number = 0
    try:
        async for event in events:
            yield _frame(event, number)
            number += 1
    except APIError as e:  # EngineFault included: logged where it was raised
        yield _frame({"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param}, number)
    except Exception:
        log.exception("error while streaming")
        yield _frame({"type": "error", "code": "server_error", "param": None,
                      "message": "Internal server error while streaming; the server log has the details."}, number)
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()


async def response_events(job: Job, req: ResponsesRequest, run: ChatRun, response_id: str, outputs: Outputs,
                          count_tokens: Callable[[str], int],
                          on_done: Callable[[dict[str, Any]], None]) -> AsyncGenerator[dict[str, Any], None]:
    """The events of one streamed response; `on_done` gets the final Response (to store it)."""
    model = job.ctx.model_name
    snapshot = response_object(req, response_id, run.created, model, "in_progress", [], None)
    yield {"type": "response.created", "response": snapshot}
    yield {"type": "response.in_progress", "response": snapshot}
    builder, parser = OutputBuilder(), run.plan.parser()
    generated = cached = 0
    finish_reason: str | None = None
    async for _, out in outputs:
        generated, cached = out.num_generated_tokens, out.num_cached_tokens
        for o in out.outputs:
            delta = chat_agents.delta(run.plan, parser, o.text, o.finish_reason is not None)
            for event in builder.feed(delta):
                yield event
            finish_reason = o.finish_reason or finish_reason
    status = status_of(finish_reason)
    for event in builder.finish(status):
        yield event
    usage = response_usage(len(run.prompt_ids), generated, cached, count_tokens(builder.reasoning_text))
    final = response_object(req, response_id, run.created, model, status, builder.items, usage)
    on_done(final)
    job.log_done(response_id, len(run.prompt_ids), generated, [finish_reason or "abort"])
    yield {"type": _FINAL[status], "response": final}
