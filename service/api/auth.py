"""API keys on /v1/*, /tokenize and /detokenize (probes and /metrics stay open, as in vLLM), sent as
`Authorization: Bearer KEY` (OpenAI's clients, ANTHROPIC_AUTH_TOKEN) or `x-api-key: KEY` (Anthropic's clients).

Keys are compared as SHA-256 digests with `hmac.compare_digest`, and every configured key is checked even
after a match, so neither the key's content nor which key matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import anthropic_error, is_anthropic_path

PROTECTED_PATHS = ("/tokenize", "/detokenize")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in PROTECTED_PATHS


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]

    def _authorized(self, header: bytes | None, api_key: bytes | None = None) -> bool:
        """`Authorization: Bearer KEY` or `x-api-key: KEY` (either may hold the key)."""
        bearer = None
        if header is not None:
            scheme, _, token = header.decode("latin-1").partition(" ")
            bearer = token if scheme.lower() == "bearer" else None
        given = [_digest(t.strip()) for t in (bearer, api_key.decode("latin-1") if api_key is not None else None)
                 if t is not None]
        ok = False
        for g in given:
            for d in self._digests:
                ok |= hmac.compare_digest(g, d)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header, api_key = headers.get(b"authorization"), headers.get(b"x-api-key")
        if self._authorized(header, api_key):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key" if header is None and api_key is None else "Invalid API key") + \
            ": send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
        error = anthropic_error(401, message) if is_anthropic_path(scope["path"]) else {"error": {
            "message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        body = json.dumps(error).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
