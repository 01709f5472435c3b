"""Bearer-token authentication, as middleware on the mounts that need it (admin API, metrics)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request
from starlette.routing import BaseRoute, Match

from proxy.asgi import App, Receive, Scope, Send
from proxy.control.problems import problem_response


def bearer_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """Lets a request for one of ``routes`` through with the right token; 401 otherwise.

    With no token configured the routes behind it answer 404, saying the API is disabled and which
    setting enables it. Requests that match no route (404), or a route but not its method (405), go
    on to the router untouched, as if the routes themselves checked the token.
    """

    def __init__(
        self,
        app: App,
        token: str,
        routes: Sequence[BaseRoute],
        what: str = "admin",
        enable_with: str = "[admin] token (FLAGPROXY_ADMIN_TOKEN)",
    ) -> None:
        self.app = app
        self.token = token
        self.routes = routes
        self.what = what
        self.enable_with = enable_with  # the setting that turns the routes on, named in their 404

    def guarded(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guarded(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self.token:
            detail = f"the {self.what} API is disabled: set {self.enable_with} to enable {request.url.path}"
            await problem_response(404, "not_found", detail)(scope, receive, send)
            return
        if not bearer_matches(request.headers.get("authorization", ""), self.token):
            detail = f"a valid {self.what} bearer token is required"
            await problem_response(401, "unauthorized", detail)(scope, receive, send)
            return
        await self.app(scope, receive, send)
