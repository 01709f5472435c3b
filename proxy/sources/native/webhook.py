"""``POST /__flags/webhooks/native``: a whole document or a patch, signed with ``[webhooks] secret``."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.control.bodies import parse_json, read_body
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import apply, check_hmac_signature, counted, result_response
from proxy.engine import FlagError
from proxy.sources.native.document import SOURCE, change_from_payload
from proxy.store.change import Change


def _validated(body: bytes) -> Change:
    return change_from_payload(parse_json(body), actor="webhook:native")


@counted(SOURCE)
async def native_webhook(request: Request) -> Response:
    deps = deps_of(request)
    settings = deps.settings.webhooks
    if not settings.secret:
        raise HTTPProblem(404, "not_found", "the native webhook is disabled: set [webhooks] secret")
    body = await read_body(request, settings.max_body_bytes)
    check_hmac_signature(settings.secret, body, request.headers.get("x-flagproxy-signature", ""))
    try:
        # Validating compiles every flag: for a big document, seconds of CPU kept off the event loop.
        change = await asyncio.to_thread(_validated, body)
    except FlagError as exc:
        raise HTTPProblem(422, "invalid_flags", str(exc), field=exc.path) from None
    result = await apply(deps.store, change)
    request.state.outcome = result.status
    return result_response(result, 202)


ROUTES = [Route("/native", native_webhook, methods=["POST"])]
