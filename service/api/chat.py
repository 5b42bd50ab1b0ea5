"""POST /v1/chat/completions: template the conversation, generate, answer as JSON or as SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.api import chat_agents
from service.api.body import parse_body
from service.api.context import ServingContext
from service.api.generation import Outputs
from service.api.job import Job, new_id, usage
from service.api.logprobs import TokenNamer, chat_logprobs
from service.api.protocol import ChatCompletionRequest
from service.api.reasoning_parser import THINK_CLOSE


@dataclass
class ChatRun:
    """A chat request submitted to the engine: what a route needs to answer it in its own shape."""

    plan: chat_agents.ChatPlan
    prompt_ids: list[int]
    response_id: str
    created: int
    context_limited: bool = False  # max_tokens was cut to what the context had left (fit_context)


def check_chat(ctx: ServingContext, req: ChatCompletionRequest) -> None:
    """What can be refused before admission (a 400 rather than a 503 when the server is full)."""
    ctx.check_model(req.model)
    ctx.check_n(req.n)
    ctx.check_token_ids(req.stop_token_ids or [], "stop_token_ids")


async def start_chat(ctx: ServingContext, job: Job, req: ChatCompletionRequest, id_prefix: str,
                     fit_context: bool = False) -> ChatRun:
    """Check, render, encode, plan and submit `req` on `job`: the one path of every chat-shaped API (chat
    completions, Anthropic Messages, OpenAI Responses translate their requests into a ChatCompletionRequest).
    `fit_context`: a max_tokens beyond what the context has left is cut to fit rather than refused (Anthropic's
    newer models answer so, ending with `model_context_window_exceeded`)."""
    ctx.check_model(req.model)
    ctx.check_n(req.n)
    ctx.check_token_ids(req.stop_token_ids or [], "stop_token_ids")
    messages = [m.for_template() for m in req.messages]
    text = await ctx.render_chat(messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs)
    prompt_ids = await ctx.encode(text, add_special_tokens=False, prompt_of="messages")
    requested = req.requested_max_tokens
    room = ctx.max_model_len - len(prompt_ids)
    limited = fit_context and requested is not None and 0 < room < requested
    max_tokens = ctx.resolve_max_tokens(len(prompt_ids), room if limited else requested, chat=True)
    ctx.check_token_ids(list(req.logit_bias_ids), "logit_bias")
    ctx.check_token_ids(req.allowed_token_ids or [], "allowed_token_ids")
    plan = await chat_agents.plan_chat(req, text, ctx.tokenizer, ctx.tool_parser_on, ctx.reasoning_parser_on)
    params = req.sampling_params(max_tokens, req.num_logprobs, None, ctx.sampling_defaults,
                                 plan.bad_words_token_ids, plan.spec)
    if req.thinking_token_budget is not None and plan.in_reasoning:  # a prompt that opens no block has no budget
        params = replace(params, reasoning_budget=req.thinking_token_budget,
                         reasoning_end_token_ids=ctx.tokenizer.encode(THINK_CLOSE, False))
    response_id = new_id(id_prefix)
    job.log_prompt(response_id, text)
    job.submit(response_id, prompt_ids, params)
    return ChatRun(plan, prompt_ids, response_id, int(time.time()), limited)


async def create_chat_completion(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    req = await parse_body(request, ChatCompletionRequest, ctx.settings.max_request_body_bytes)
    check_chat(ctx, req)
    async with Job(ctx, request) as job:
        run = await start_chat(ctx, job, req, "chatcmpl")
        plan, response_id, created = run.plan, run.response_id, run.created
        prompt_ids = run.prompt_ids
        namer = TokenNamer(ctx.tokenizer, req.return_tokens_as_token_ids)
        if req.stream:
            return await job.stream(_chunks(job, req, plan, response_id, created, namer, job.outputs(),
                                            len(prompt_ids)))
        [result] = await job.collect()
        choices = []
        for i, c in enumerate(result.choices):
            message, reason = chat_agents.message(plan, c.text, c.finish_reason)
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(c.logprobs, namer) if req.logprobs else None,
                            "finish_reason": reason, "stop_reason": c.stop_reason})
        job.log_done(response_id, result.num_prompt_tokens, result.num_generated_tokens,
                     [str(c.finish_reason) for c in result.choices])
        return JSONResponse({"id": response_id, "object": "chat.completion", "created": created,
                             "model": ctx.model_name, "choices": choices,
                             "usage": usage(result.num_prompt_tokens, result.num_generated_tokens,
                                            result.num_cached_tokens)})


async def _chunks(job: Job, req: ChatCompletionRequest, plan: chat_agents.ChatPlan, response_id: str, created: int,
                  namer: TokenNamer, outputs: Outputs, prompt_tokens: int) -> AsyncGenerator[dict[str, Any], None]:
    """A role delta per choice, then reasoning / content / tool-call deltas, one finish_reason per choice, optional
    usage."""
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": job.ctx.model_name}
    generated = cached = 0
    finished: dict[int, str] = {}
    parsers = [plan.parser() for _ in range(req.n)]

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**base, "choices": choices}
        if req.continuous_usage:
            out["usage"] = usage(prompt_tokens, generated, cached)
        return out

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(req.n)])
    async for _, out in outputs:
        generated, cached = out.num_generated_tokens, out.num_cached_tokens
        for o in out.outputs:
            delta = chat_agents.delta(plan, parsers[o.index], o.text, o.finish_reason is not None)
            has_logprobs = req.logprobs and bool(o.logprobs)
            if not delta and not has_logprobs and o.finish_reason is None:
                continue
            choice: dict[str, Any] = {"index": o.index, "delta": delta,
                                      "logprobs": chat_logprobs(o.logprobs or [], namer) if has_logprobs else None,
                                      "finish_reason": chat_agents.stream_finish_reason(parsers[o.index],
                                                                                        o.finish_reason)}
            if o.finish_reason is not None:
                finished[o.index] = o.finish_reason
                choice["stop_reason"] = o.stop_reason
            yield chunk([choice])
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_tokens, generated, cached)}
    job.log_done(response_id, prompt_tokens, generated, [finished.get(i, "abort") for i in range(req.n)])
