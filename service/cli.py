"""`glm-serve` / `python -m service`: settings -> logging -> engine -> HTTP server.

The model loads before the port opens (as vLLM does), so a bad checkpoint fails fast with a clear message
and exit code 1, and probes see connection refused rather than a half-started server.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from service.api.app import build_app
from service.engine.client import Engine
from service.logging_setup import configure_logging
from service.server import DrainingServer
from service.settings import Settings, SettingsError, parse_settings

log = logging.getLogger("service")


def serve(settings: Settings, engine: Engine, model_dir: Path, model_name: str) -> int:
    """Run the HTTP server around an already-built engine until drained. Returns the exit code."""
    app = build_app(settings, engine, model_dir, model_name)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=10, server_header=False)
    server = DrainingServer(config, app.state.ctx, settings.shutdown_timeout)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except SettingsError as e:
        print(f"glm-serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        model_dir = settings.model_dir()
    except SettingsError as e:
        log.error("%s", e)
        return 1
    model_name = settings.model_name(model_dir)
    log.info("loading model", extra={"fields": {"model_dir": str(model_dir), "served_model_name": model_name}})
    try:
        # heavy imports (torch); only once settings are valid
        from service.engine.client import EngineClient

        config = settings.engine_config(model_dir)
        engine = EngineClient.in_process(config) if settings.engine_process else EngineClient.in_thread(config)
    except (OSError, ValueError) as e:  # missing files, unreadable or unsupported checkpoints
        log.error("cannot load %s: %s", model_dir, e)
        return 1
    return serve(settings, engine, model_dir, model_name)
