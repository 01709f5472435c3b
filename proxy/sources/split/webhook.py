"""``POST /__flags/webhooks/split?token=…``: Split's audit-log webhook.

Authenticated by a shared token (``[split] webhook_token``), answered at once (Split retries slow
endpoints), and followed by a pull from Split's API: the webhook only says *that* something changed.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.bodies import read_json
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import counted
from proxy.sources.split.settings import SplitSettings
from proxy.sources.split.sync import SOURCE


@counted(SOURCE)
async def split_webhook(request: Request) -> Response:
    deps = deps_of(request)
    settings: SplitSettings = deps.settings.section(SOURCE)
    if not settings.webhook_token:
        raise HTTPProblem(404, "not_found", "the Split webhook is disabled: set [split] webhook_token")
    given = request.query_params.get("token", "")
    if not hmac.compare_digest(given.encode(), settings.webhook_token.encode()):
        raise HTTPProblem(401, "bad_token", "the ?token= query parameter is missing or wrong")
    payload = await read_json(request, deps.settings.webhooks.max_body_bytes)
    if not isinstance(payload, dict):
        raise HTTPProblem(422, "invalid_payload", "expected a Split audit-log object")
    environment = payload.get("environmentName")
    if settings.environments and environment not in settings.environments:
        request.state.outcome = "ignored"
        return JSONResponse({"status": "ignored", "detail": f"environment {environment!r} is not synced"})
    sync = deps.syncs.get(SOURCE)
    if sync is None or not sync.enabled:
        raise HTTPProblem(503, "split_disabled", "no [split] sdk_key is configured to pull definitions")
    sync.trigger()
    return JSONResponse({"status": "accepted", "flag": payload.get("name")})


ROUTES = [Route("/split", split_webhook, methods=["POST"])]
