"""POST /v1/completions: one engine request per prompt (string, strings, token ids, lists of token ids).

Choice `index` is `prompt_index * n + choice` (OpenAI's convention for batched prompts). `echo` puts the
prompt in front of the completion text and, with `logprobs`, the prompt tokens' logprobs in front of the
completion's (the first prompt token has none).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.api.body import parse_body
from service.api.chat_agents import completion_constraints
from service.api.context import ServingContext
from service.api.generation import Outputs
from service.api.job import Job, new_id, usage
from service.api.logprobs import CompletionLogprobs, TokenNamer
from service.api.protocol import CompletionRequest


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # for echo


def _join(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: a[k] + b[k] for k in a}


async def create_completion(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    req = await parse_body(request, CompletionRequest, ctx.settings.max_request_body_bytes)
    ctx.check_model(req.model)
    ctx.check_n(req.n)
    ctx.check_token_ids(req.stop_token_ids or [], "stop_token_ids")
    for p in req.prompts():
        if not isinstance(p, str):
            ctx.check_token_ids(p, "prompt")
    async with Job(ctx, request) as job:
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append(_Prompt(await ctx.encode(p, req.add_special_tokens, prompt_of="prompt"), p))
            else:
                text = ctx.tokenizer.decode(p, skip_special_tokens=False) if req.echo and ctx.tokenizer else ""
                prompts.append(_Prompt(p, text))
        max_tokens = [ctx.resolve_max_tokens(len(p.ids), req.max_tokens, chat=False) for p in prompts]
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        ctx.check_token_ids(list(req.logit_bias_ids), "logit_bias")
        ctx.check_token_ids(req.allowed_token_ids or [], "allowed_token_ids")
        bad_words, spec = await completion_constraints(req, ctx.need_tokenizer("bad_words and structured outputs")) \
            if req.bad_words or req.structured_outputs or req.response_format is not None else ([], None)
        params = [req.sampling_params(mt, req.logprobs, prompt_logprobs, ctx.sampling_defaults, bad_words, spec)
                  for mt in max_tokens]
        response_id = new_id("cmpl")
        job.log_prompt(response_id, req.prompt)
        for i, (p, ps) in enumerate(zip(prompts, params, strict=True)):
            job.submit(response_id if len(prompts) == 1 else f"{response_id}-{i}", p.ids, ps)
        namer = TokenNamer(ctx.tokenizer, req.return_tokens_as_token_ids)
        created = int(time.time())
        if req.stream:
            return await job.stream(_chunks(job, req, response_id, created, namer, prompts, job.outputs()))
        results = await job.collect()
        choices = []
        for p, r in zip(prompts, results, strict=True):
            for c in r.choices:
                lp = None
                if req.logprobs is not None:
                    fmt = CompletionLogprobs(namer)
                    lp = fmt.format(c.token_ids, list(c.logprobs))
                    if req.echo:
                        fmt = CompletionLogprobs(namer)
                        lp = _join(fmt.format(p.ids, list(r.prompt_logprobs or [None] * len(p.ids))),
                                   CompletionLogprobs(namer, fmt.offset).format(c.token_ids, list(c.logprobs)))
                choices.append({"index": len(choices), "text": (p.text if req.echo else "") + c.text,
                                "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens = sum(r.num_generated_tokens for r in results)
        job.log_done(response_id, prompt_tokens, completion_tokens, [str(c["finish_reason"]) for c in choices])
        return JSONResponse({"id": response_id, "object": "text_completion", "created": created,
                             "model": ctx.model_name, "choices": choices,
                             "usage": usage(prompt_tokens, completion_tokens,
                                            sum(r.num_cached_tokens for r in results))})


async def _chunks(job: Job, req: CompletionRequest, response_id: str, created: int, namer: TokenNamer,
                  prompts: list[_Prompt], outputs: Outputs) -> AsyncGenerator[dict[str, Any], None]:
    base = {"id": response_id, "object": "text_completion", "created": created, "model": job.ctx.model_name}
    prompt_tokens = sum(len(p.ids) for p in prompts)
    generated = [0] * len(prompts)
    cached = [0] * len(prompts)
    formatters: dict[int, CompletionLogprobs] = {}
    finished: dict[int, str] = {}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        out = {**base, "choices": [choice]}
        if req.continuous_usage:
            out["usage"] = usage(prompt_tokens, sum(generated), sum(cached))
        return out

    prompt_lps: dict[int, list[Any]] = {}
    async for i, out in outputs:
        generated[i], cached[i] = out.num_generated_tokens, out.num_cached_tokens
        p = prompts[i]
        if out.prompt_logprobs is not None:
            prompt_lps[i] = list(out.prompt_logprobs)
        for o in out.outputs:
            index = i * req.n + o.index
            text, lp, head = o.text, None, None
            if index not in formatters:  # this choice's first chunk: echo the prompt in front
                offset = 0
                if req.echo:
                    text = p.text + text
                    if req.logprobs is not None:
                        head_fmt = CompletionLogprobs(namer)
                        head = head_fmt.format(p.ids, prompt_lps.get(i) or [None] * len(p.ids))
                        offset = head_fmt.offset
                formatters[index] = CompletionLogprobs(namer, offset)
            if req.logprobs is not None:
                lp = formatters[index].format(o.token_ids, list(o.logprobs or []))
                if head is not None:
                    lp = _join(head, lp)
            if not text and not (lp and lp["tokens"]) and o.finish_reason is None:
                continue
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
            if o.finish_reason is not None:
                finished[index] = o.finish_reason
                choice["stop_reason"] = o.stop_reason
            yield chunk(choice)
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_tokens, sum(generated), sum(cached))}
    job.log_done(response_id, prompt_tokens, sum(generated), list(finished.values()))
