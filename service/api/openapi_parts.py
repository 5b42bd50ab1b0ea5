"""The pieces every route family's OpenAPI operations are made of: schema references, JSON bodies, error
responses (with Retry-After on 503)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def json_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(model)}}}


def error_responses(error: type[BaseModel], why: dict[int, str], statuses: tuple[int, ...],
                    suffix: str = "") -> dict[str, Any]:
    """`statuses` answered with the `error` body, described by `why`; a 503 says when to retry."""
    out = {str(s): json_body(error, why[s] + suffix) for s in statuses}
    if "503" in out:
        out["503"]["headers"] = RETRY_AFTER
    return out
