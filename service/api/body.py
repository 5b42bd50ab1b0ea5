"""Reading a JSON request body: size limit (413), a JSON content type (415), strict JSON (no NaN/Infinity, valid
Unicode, at most MAX_JSON_DEPTH levels deep), an object at the top (400).

Routes read bodies themselves rather than through FastAPI's parameter binding so that every failure has
our error shape and the size limit holds for chunked uploads too (Content-Length may be absent).

A body sent as text/plain, a form or multipart is refused before it is read: those are the content types a web
page may POST cross-origin without a CORS preflight, so refusing them keeps a browser from driving a local
server. A missing Content-Type is read as JSON (scripts often omit it). JSON may escape lone UTF-16 surrogates
(`"\\ud800"`), which are not Unicode text: no tokenizer or UTF-8 encoder accepts them, so they are refused here.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service.api.errors import APIError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# No OpenAI request nests this deep (tool schemas included), and everything downstream that walks a request (pydantic,
# chat template context, tojson) recurses per level: a 1 KB body 500 levels deep would otherwise exhaust the stack.
MAX_JSON_DEPTH = 64


def _check_content_type(value: str | None) -> None:
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise APIError(415, f"Content-Type must be application/json, got {value[:100]!r}.",
                   code="unsupported_media_type")


def _too_deep(data: Any, raw: bytes) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # cannot nest deeper than it has brackets
        return False
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = x.values() if isinstance(x, dict) else x
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _has_lone_surrogate(data: Any) -> bool:
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    _check_content_type(request.headers.get("content-type"))
    too_large = APIError(413, f"Request body exceeds the limit of {limit} bytes (--max-request-body-bytes).",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer, but it must not be logged as a server error
        raise bad_request("The client disconnected while sending the request body.") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object.")
    try:  # strict UTF-8 (RFC 8259; a BOM is ignored): json.loads(bytes) would also let encoded surrogates pass
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("Request body is not valid UTF-8.") from None
    except ValueError as e:  # JSONDecodeError is a ValueError; so is our NaN/Infinity refusal
        raise bad_request(f"Request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(data).__name__}.")
    if _too_deep(data, raw):
        raise bad_request(f"Request body is nested deeper than {MAX_JSON_DEPTH} levels.")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        raise bad_request("Request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); strings must be "
                          "valid Unicode.")
    return data


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    """Read the JSON body (see read_json_body) and validate it into `model`; invalid fields are a 400."""
    data = await read_json_body(request, limit)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
