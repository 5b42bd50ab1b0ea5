"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the right status; on the
Anthropic Messages paths (`/v1/messages*`) in Anthropic's: `{"type": "error", "error": {"type", "message"},
"request_id"}`, with the same statuses (Anthropic's error types; a full queue stays 503 + Retry-After, which the
anthropic SDKs retry as they retry every 5xx, rather than Anthropic's own 529).

Every failure a client can cause becomes an APIError (400/401/404/405/413/503/504); FastAPI's 422 and
Starlette's `{"detail": ...}` bodies are replaced here; anything else is a bug and gets a 500 whose body
names no internals (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.sampling_params import SamplingParamError
from service.logging_setup import request_id_var

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable", 504: "timeout"}


# Anthropic's error types by status (https://docs.claude.com/en/api/errors); other 4xx are invalid_request_error
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                    504: "timeout_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    """Paths whose errors take Anthropic's shape: the Messages API."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id_var.get()}


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+~-]+){2,}[\\/]?")


def redact(text: object, limit: int = 300) -> str:
    """An engine failure's text as a client may see it: its first line, file paths replaced, length capped.

    Exception messages from torch and friends often name source files; the full text stays in the server log.
    """
    first = str(text).strip().splitlines()[0] if str(text).strip() else "unknown error"
    first = _PATH.sub("<path>", first)
    return first if len(first) <= limit else first[:limit] + "..."


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        return anthropic_error(self.status, self.message)

    def response(self, path: str = "") -> JSONResponse:
        """The error in the shape of the API `path` belongs to."""
        body = self.anthropic_body() if is_anthropic_path(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client hung up before the response started; its engine requests were aborted (logged as 499)."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _is_type_tag(x: object) -> bool:
    """Union members appear in pydantic's loc (`stop.list[str]`); the client only needs the field path."""
    return isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or x.startswith(("function-", "lax-", "strict-")))


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """Pydantic's error list as one readable 400; `param` is the first offending field's path."""
    errors = e.errors()
    parts, param = [], None
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x))
        param = param or loc or None
        msg = str(err.get("msg", "")).removeprefix("Value error, ")  # our own validators' ValueErrors
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return bad_request("; ".join(parts) + more, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(SamplingParamError)
    async def _sampling(request: Request, exc: SamplingParamError) -> JSONResponse:
        return bad_request(str(exc), param=exc.param).response(request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        log.info("client disconnected; request aborted", extra={"fields": {"request_id": request_id_var.get()}})
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"{request.method} {request.url.path} not found", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}",
                           code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            err = APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return err.response(request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"fields": {"method": request.method, "path": request.url.path}})
        return APIError(500, "Internal server error; the server log has the details.").response(request.url.path)
