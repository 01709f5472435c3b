"""CORS for the client API (``[client_api] cors_origins``: exact origins, or ``*``).

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin is answered
here, 204, before any key is checked (browsers send no credentials on it); one from another origin
gets 403. Every other response to an allowed origin — errors included, so a page can read a 401 or
429 — carries ``Access-Control-Allow-Origin`` (the origin itself with ``Vary: Origin``, or ``*``)
and exposes ``ETag`` and ``Retry-After``. With no origins configured nothing is added, and a
preflight gets a 403 saying CORS is off (rather than a bare 405 for ``OPTIONS``).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.exceptions import HTTPException

from proxy.asgi import App, Message, Receive, Scope, Send
from proxy.control.clients.responses import JSON, header, plain_error, respond

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"Content-Type, Authorization, X-API-Key, If-None-Match"
EXPOSE_HEADERS = b"ETag, Retry-After"
PREFLIGHT_MAX_AGE_S = 600


class ClientCors:
    def __init__(self, app: App, origins: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allowed(self, origin: str) -> list[tuple[bytes, bytes]] | None:
        if self.any:
            return [(b"access-control-allow-origin", b"*")]
        if origin in self.origins:
            return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = header(scope, b"origin") if scope["type"] == "http" else ""
        if not origin:
            await self.app(scope, receive, send)
            return
        allow = self.allowed(origin)
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            if allow is None:
                detail = (
                    "this origin is not in [client_api] cors_origins"
                    if self.origins
                    else "CORS is off: [client_api] cors_origins is empty"
                )
                body = plain_error("origin_not_allowed", detail)
                await respond(send, 403, body, [JSON])
                return
            await respond(
                send,
                204,
                b"",
                [
                    *allow,
                    (b"access-control-allow-methods", ALLOW_METHODS),
                    (b"access-control-allow-headers", ALLOW_HEADERS),
                    (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
                ],
            )
            return
        if allow is None:
            await self.app(scope, receive, send)
            return
        extra = [*allow, (b"access-control-expose-headers", EXPOSE_HEADERS)]

        started = False

        async def with_cors(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, with_cors)
        except HTTPException as exc:  # the router's 404 and 405: answered here, so they carry CORS too
            if started:
                raise
            error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            detail = (
                f"no client API endpoint {scope.get('path', '')}" if exc.status_code == 404 else exc.detail
            )
            allow = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
            await respond(with_cors, exc.status_code, plain_error(error, detail), [JSON, *allow])
