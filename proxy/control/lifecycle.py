"""``/__flags/api/stale``: the potentially stale flags, and why (docs/lifecycle.md)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.lifecycle.stale import iso
from proxy.store.base import StoreUnavailable


async def stale(request: Request) -> Response:
    lifecycle = deps_of(request).lifecycle
    if lifecycle is None:
        raise HTTPProblem(404, "not_found", "the flag lifecycle is not running")
    now = lifecycle.clock()
    try:
        found = await lifecycle.report(now)
    except StoreUnavailable as exc:
        raise HTTPProblem(503, "store_unavailable", str(exc)) from None
    return JSONResponse({"stale": found, "checked_at": iso(now)})


ROUTES = [Route("/stale", stale, methods=["GET"])]
