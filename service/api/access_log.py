"""One log line and one `http_requests_total` increment per HTTP request, and the request id.

The id is the client's `X-Request-Id` when it sends a sane one, else a fresh one; it is echoed in the
response header and set in the logging context variable so every log line of the request carries it.
Paths are logged, bodies never (prompts stay out of logs unless --log-prompts).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logging_setup import request_id_var
from service.metrics import ServiceMetrics

log = logging.getLogger("service.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.monotonic()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_request(scope["method"], route_path, status or 500)
            if scope["path"] not in ("/health", "/ready", "/metrics"):  # probes would drown the log
                duration_ms = round((time.monotonic() - start) * 1e3, 1)
                log.info("http", extra={"fields": {"method": scope["method"], "path": scope["path"],
                                                   "status": status, "duration_ms": duration_ms}})
            request_id_var.reset(token)
