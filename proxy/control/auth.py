"""Bearer-token authentication, as middleware on the mounts that need it (admin API, metrics)."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from proxy.asgi import App, Receive, Scope, Send
from proxy.control.problems import problem_response


def bearer_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """Lets a request through with the right token; 401 otherwise.

    With no token configured the routes behind it do not exist (404): a disabled API answers like an
    absent one. ``what`` names the token in the 401 detail.
    """

    def __init__(self, app: App, token: str, what: str = "admin", disabled_detail: str = "") -> None:
        self.app = app
        self.token = token
        self.what = what
        self.disabled_detail = disabled_detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self.token:
            detail = self.disabled_detail or f"no control endpoint {request.url.path}"
            await problem_response(404, "not_found", detail)(scope, receive, send)
            return
        if not bearer_matches(request.headers.get("authorization", ""), self.token):
            detail = f"a valid {self.what} bearer token is required"
            await problem_response(401, "unauthorized", detail)(scope, receive, send)
            return
        await self.app(scope, receive, send)
