"""Reading a JSON request body: size limit (413), strict JSON (no NaN/Infinity), an object at the top (400).

Routes read bodies themselves rather than through FastAPI's parameter binding so that every failure has
our error shape and the size limit holds for chunked uploads too (Content-Length may be absent).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from service.api.errors import APIError, bad_request


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
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
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("Request body is not valid UTF-8.") from None
    except ValueError as e:  # JSONDecodeError is a ValueError; so is our NaN/Infinity refusal
        raise bad_request(f"Request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(data).__name__}.")
    return data
