"""POST /v1/responses (OpenAI's Responses API, which Codex speaks), GET and DELETE /v1/responses/{id}.

A thin translation onto the chat path: the request becomes a ChatCompletionRequest (responses_protocol.to_chat,
after the stored conversation of `previous_response_id`), `chat.start_chat` renders, plans and submits it on a
Job (admission, auth, limits, disconnect-abort, drain and metrics are the chat endpoint's), and the choice's
text is read by the chat parsers into Responses output items (responses_output).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.api.body import parse_body
from service.api.chat import check_chat, start_chat
from service.api.context import ServingContext
from service.api.errors import APIError, bad_request, from_validation_error
from service.api.job import Job
from service.api.response_store import ResponseStore
from service.api.responses_output import (
    OutputBuilder,
    feed_text,
    response_object,
    response_usage,
    status_of,
)
from service.api.responses_protocol import ResponsesRequest, to_chat
from service.api.responses_stream import response_events, typed_events

# A chat request's fields as the Responses request names them (for the `param` of a 400 the chat path raises)
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}


def _in_responses_words(e: APIError) -> APIError:
    """A 4xx of the chat path, naming the Responses request's fields instead of chat's."""
    e.param = _PARAMS.get(e.param or "", e.param)
    if e.code == "context_length_exceeded":
        e.message = e.message.replace("messages", "input")
    return e


def response_store(app: FastAPI) -> ResponseStore:
    """The app's store, made on first use from --responses-store-size / --responses-store-ttl."""
    store = getattr(app.state, "response_store", None)
    if store is None:
        settings = app.state.ctx.settings
        store = app.state.response_store = ResponseStore(settings.responses_store_size, settings.responses_store_ttl)
    return store


def _not_found(response_id: str) -> APIError:
    shown = response_id if len(response_id) <= 256 else response_id[:256] + "..."
    return APIError(404, f"Response with id '{shown}' not found.", param="response_id", code="not_found")


async def create_response(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    req = await parse_body(request, ResponsesRequest, ctx.settings.max_request_body_bytes)
    store = response_store(request.app)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        found = store.conversation(req.previous_response_id)
        if found is None:  # OpenAI's answer: a 400, not a 404 (the route exists; the reference is bad)
            shown = req.previous_response_id[:256]
            raise APIError(400, f"Previous response with id '{shown}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        history = found
    items = history + req.input_items()
    try:
        chat_req = to_chat(req, items)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except ValueError as e:
        raise bad_request(str(e), param="input") from None
    try:
        check_chat(ctx, chat_req)
    except APIError as e:
        raise _in_responses_words(e) from None

    def count_tokens(text: str) -> int:
        return len(ctx.tokenizer.encode(text, False)) if text and ctx.tokenizer is not None else 0

    def keep(response: dict[str, Any]) -> None:
        if req.store and response["status"] != "failed":
            store.put(response, items)

    async with Job(ctx, request) as job:
        try:
            run = await start_chat(ctx, job, chat_req, "resp")
        except APIError as e:
            raise _in_responses_words(e) from None
        response_id = "resp_" + run.response_id.split("-", 1)[1]
        if req.stream:
            return await job.stream(response_events(job, req, run, response_id, job.outputs(), count_tokens, keep),
                                    framing=typed_events)
        [result] = await job.collect()
        choice = result.choices[0]
        builder = OutputBuilder()
        feed_text(builder, run.plan, choice.text)
        status = status_of(choice.finish_reason)
        builder.finish(status)
        usage = response_usage(result.num_prompt_tokens, result.num_generated_tokens, result.num_cached_tokens,
                               count_tokens(builder.reasoning_text))
        response = response_object(req, response_id, run.created, ctx.model_name, status, builder.items, usage)
        keep(response)
        job.log_done(response_id, result.num_prompt_tokens, result.num_generated_tokens,
                     [str(choice.finish_reason)])
        return JSONResponse(response)


async def get_response(response_id: str, request: Request) -> JSONResponse:
    entry = response_store(request.app).get(response_id)
    if entry is None:
        raise _not_found(response_id)
    return JSONResponse(entry.response)


async def delete_response(response_id: str, request: Request) -> JSONResponse:
    if not response_store(request.app).delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
