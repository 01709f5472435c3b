"""``POST /__flags/webhooks/native``: a whole document or a patch, signed with ``[webhooks] secret``.

The signature binds the time (``t=``), which also orders the change's versionless flags and deletes;
an ``X-Flagproxy-Delivery`` id is applied once within the signature window, on every instance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.control.bodies import parse_json, read_body
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import apply, check_signature, counted, delivery_id, result_response
from proxy.engine import FlagError
from proxy.sources.native.document import SOURCE, change_from_payload
from proxy.store.change import Change


def _validated(body: bytes, stamp: int) -> Change:
    return change_from_payload(parse_json(body), actor="webhook:native", stamp=stamp)


@counted(SOURCE)
async def native_webhook(request: Request) -> Response:
    deps = deps_of(request)
    settings = deps.settings.webhooks
    if not settings.secret:
        raise HTTPProblem(404, "not_found", "the native webhook is disabled: set [webhooks] secret")
    body = await read_body(request, settings.max_body_bytes)
    signed = check_signature(
        settings.secret,
        body,
        request.headers.get("x-flagproxy-signature", ""),
        legacy=settings.legacy_signatures,
        now=time.time(),
    )
    delivery = delivery_id(request)
    try:
        # Validating compiles every flag: for a big document, seconds of CPU kept off the event loop.
        change = await asyncio.to_thread(_validated, body, signed.at_ms)
    except FlagError as exc:
        raise HTTPProblem(422, "invalid_flags", str(exc), field=exc.path) from None
    if delivery:  # the id is not signed: bound to the body, so a replay under it suppresses nothing
        bound = f"{delivery}:{hashlib.sha256(body).hexdigest()[:32]}"
        change = dataclasses.replace(change, delivery=bound, delivery_ttl_s=signed.window_s)
    result = await apply(deps.store, change)
    request.state.outcome = result.status
    return result_response(result, 202)


ROUTES = [Route("/native", native_webhook, methods=["POST"])]
