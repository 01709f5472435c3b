"""``GET /__flags/api/audit``: who changed what, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.store.base import StoreUnavailable


async def audit(request: Request) -> Response:
    deps = deps_of(request)
    audit_max = deps.settings.store.audit_max
    limit = request.query_params.get("limit", str(min(100, audit_max)))
    if not limit.isdigit() or not 1 <= int(limit) <= audit_max:
        raise HTTPProblem(400, "bad_limit", f"limit must be 1..{audit_max}")
    try:
        entries = await deps.store.audit(int(limit))
    except StoreUnavailable:  # the why (with Redis's address) is in the store's log lines
        raise HTTPProblem(
            503, "store_unavailable", "the audit log cannot be read now (Redis unavailable)"
        ) from None
    return JSONResponse({"entries": entries})


ROUTES = [Route("/audit", audit, methods=["GET"])]
