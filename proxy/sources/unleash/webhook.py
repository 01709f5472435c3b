"""``POST /__flags/webhooks/unleash``: Unleash's webhook integration.

Unleash posts a change *event*, not the state, and may deliver duplicates or out of order; so the
webhook only wakes the sync, which pulls the state itself (the store keeps the newest revision).
Authenticated by the ``Authorization`` header, compared in constant time with ``[unleash]
webhook_token`` (set the same value in the integration's "Authorization" field); answered ``202``
at once, before any pull.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import counted
from proxy.sources.unleash.settings import UnleashSettings

SOURCE = "unleash"


@counted(SOURCE)
async def unleash_webhook(request: Request) -> Response:
    deps = deps_of(request)
    settings: UnleashSettings = deps.settings.section(SOURCE)
    if not settings.webhook_token:
        raise HTTPProblem(404, "not_found", "the Unleash webhook is disabled: set [unleash] webhook_token")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), settings.webhook_token.encode()):
        raise HTTPProblem(401, "bad_token", "the Authorization header is missing or wrong")
    sync = deps.syncs.get(SOURCE)
    if sync is None or not sync.enabled:
        raise HTTPProblem(
            503, "unleash_disabled", "no [unleash] api_url and client token to pull features with"
        )
    sync.trigger()
    return JSONResponse({"status": "accepted"}, status_code=202)


ROUTES = [Route("/unleash", unleash_webhook, methods=["POST"])]
