"""API keys on /v1/*, /tokenize and /detokenize (probes and /metrics stay open, as in vLLM).

Keys are compared as SHA-256 digests with `hmac.compare_digest`, and every configured key is checked even
after a match, so neither the key's content nor which key matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PATHS = ("/tokenize", "/detokenize")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in PROTECTED_PATHS


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = _digest(token.strip())
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        if self._authorized(header):
            await self.app(scope, receive, send)
            return
        message = "Missing API key" if header is None else "Invalid API key"
        body = json.dumps({"error": {"message": f"{message}: send 'Authorization: Bearer <key>'.",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
