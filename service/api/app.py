"""The FastAPI application around one engine: routes, error shapes, auth, CORS, access log, lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.access_log import AccessLogMiddleware
from service.api.auth import APIKeyMiddleware
from service.api.context import ServingContext
from service.api.errors import install_error_handlers
from service.api.openapi import install_openapi
from service.api.routes import router
from service.engine.client import Engine
from service.settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, engine: Engine, model_dir: Path, model_name: str) -> FastAPI:
    """The app around `engine`, which it starts and stops with its lifespan."""
    ctx = ServingContext(engine, settings, model_dir, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        ctx.ready = True
        log.info("ready", extra={"fields": {"model": model_name, "max_model_len": ctx.max_model_len}})
        try:
            yield
        finally:
            ctx.ready = False
            await ctx.abort_all()
            await engine.shutdown()
            log.info("engine stopped")

    app = FastAPI(title="glm-serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.ctx = ctx
    app.include_router(router)
    install_error_handlers(app)
    install_openapi(app, api_keys=bool(settings.api_key))
    # Starlette runs the last-added middleware first: access log -> CORS -> auth -> routes, so CORS
    # preflights are answered before auth, and 401s are logged and counted.
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False, expose_headers=["X-Request-Id"])
    app.add_middleware(AccessLogMiddleware, metrics=ctx.metrics)
    return app
