"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (Claude Code, the anthropic SDKs) as a
translation onto the chat path.

A request becomes a ChatCompletionRequest (anthropic_protocol.py) and runs through `chat.check_chat` and
`chat.start_chat` like any chat completion: same template, tool-call grammar, reasoning split, admission queue,
limits, metrics, disconnect-abort and drain. The output is read by the chat path's parsers and answered in
Anthropic's shape (anthropic_stream.py); errors on these paths take Anthropic's shape (errors.py).
"""

from __future__ import annotations

from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.api import chat_agents
from service.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from service.api.anthropic_stream import content_blocks, message, message_events, message_id, stop_reason, usage
from service.api.body import parse_body
from service.api.chat import check_chat, start_chat
from service.api.context import ServingContext
from service.api.errors import APIError, from_validation_error
from service.api.job import Job
from service.api.protocol import ChatCompletionRequest
from service.api.streaming import sse_events


def _as_chat(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    try:
        return body.chat_request()
    except ValidationError as e:  # the translated request broke a chat rule (the message names the chat field)
        raise from_validation_error(e) from None


async def create_message(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    body = await parse_body(request, MessagesRequest, ctx.settings.max_request_body_bytes)
    req = _as_chat(body)
    check_chat(ctx, req)
    async with Job(ctx, request) as job:
        run = await start_chat(ctx, job, req, "msg", fit_context=True)
        if body.stream:
            return await job.stream(message_events(job, run, job.outputs()),
                                    framing=partial(sse_events, named_error=APIError.anthropic_body))
        [result] = await job.collect()
        [choice] = result.choices
        msg, finish = chat_agents.message(run.plan, choice.text, choice.finish_reason)
        reason, sequence = stop_reason(run, finish, choice.stop_reason)
        job.log_done(run.response_id, result.num_prompt_tokens, result.num_generated_tokens,
                     [str(choice.finish_reason)])
        return JSONResponse(message(message_id(run), ctx.model_name, content_blocks(msg), reason, sequence,
                                    usage(result.num_prompt_tokens, result.num_generated_tokens,
                                          result.num_cached_tokens)))


async def count_tokens(request: Request) -> Response:
    """The prompt's token count, as the same request's usage counts it (input + cache read); nothing runs."""
    ctx: ServingContext = request.app.state.ctx
    body = await parse_body(request, CountTokensRequest, ctx.settings.max_request_body_bytes)
    req = _as_chat(body)
    ctx.check_model(req.model)
    text = await ctx.render_chat([m.for_template() for m in req.messages], req.add_generation_prompt, req.tools,
                                 req.chat_template_kwargs)
    ids = await ctx.encode(text, add_special_tokens=False, prompt_of="messages")
    return JSONResponse({"input_tokens": len(ids)})

