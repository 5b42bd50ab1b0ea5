"""Routes: the OpenAI endpoints, Anthropic's Messages API, vLLM's tokenize/detokenize, probes and metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.body import parse_body
from service.api.chat import create_chat_completion
from service.api.completions import create_completion
from service.api.context import ServingContext
from service.api.errors import redact
from service.api.messages import count_tokens, create_message
from service.api.protocol import DetokenizeRequest, TokenizeRequest
from service.api.responses import create_response, delete_response, get_response

router = APIRouter()
router.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
router.add_api_route("/v1/completions", create_completion, methods=["POST"])
router.add_api_route("/v1/messages", create_message, methods=["POST"])
router.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])
router.add_api_route("/v1/responses", create_response, methods=["POST"])
router.add_api_route("/v1/responses/{response_id}", get_response, methods=["GET"])
router.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def _model_card(ctx: ServingContext, anthropic: bool) -> dict[str, object]:
    if anthropic:  # Anthropic's ModelInfo
        created = datetime.fromtimestamp(ctx.created, UTC).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": ctx.model_name, "display_name": ctx.model_name, "created_at": created}
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "glm-serve",
            "root": ctx.model_name, "parent": None, "max_model_len": ctx.max_model_len}


def _anthropic(request: Request) -> bool:
    """The anthropic SDKs (and Claude Code) send `anthropic-version` on every request; OpenAI's never do."""
    return "anthropic-version" in request.headers


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    card = _model_card(_ctx(request), _anthropic(request))
    if _anthropic(request):  # one page holds every model
        return JSONResponse({"data": [card], "first_id": card["id"], "last_id": card["id"], "has_more": False})
    return JSONResponse({"object": "list", "data": [card]})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    ctx = _ctx(request)
    ctx.check_model(model_id)
    return JSONResponse(_model_card(ctx, _anthropic(request)))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    req = await parse_body(request, TokenizeRequest, ctx.settings.max_request_body_bytes)
    ctx.check_model(req.model)
    if req.messages is not None:
        text = await ctx.render_chat([m.for_template() for m in req.messages], req.add_generation_prompt,
                                     req.tools, req.chat_template_kwargs)
        add_special = bool(req.add_special_tokens)  # the template writes the special tokens itself
    else:
        text = req.prompt or ""
        add_special = req.add_special_tokens is not False
    ids = await ctx.encode(text, add_special)
    body: dict[str, object] = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
                               "token_strs": None}
    if req.return_token_strs:
        body["token_strs"] = [ctx.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return JSONResponse(body)


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    req = await parse_body(request, DetokenizeRequest, ctx.settings.max_request_body_bytes)
    ctx.check_model(req.model)
    ctx.check_token_ids(req.tokens, "tokens")
    tok = ctx.need_tokenizer("detokenize")
    return JSONResponse({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the engine loop runs, 503 once it died (restart the pod). Draining stays 200."""
    engine = _ctx(request).engine
    if not engine.is_alive:
        return JSONResponse({"status": "dead", "reason": redact(engine.dead_reason)}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and until a drain starts (take this replica out of rotation)."""
    ctx = _ctx(request)
    if ctx.queue.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not ctx.ready or not ctx.engine.is_alive:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_ctx(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
async def root(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    return JSONResponse({"name": "glm-serve", "model": ctx.model_name, "uptime_s": round(time.time() - ctx.created)})

