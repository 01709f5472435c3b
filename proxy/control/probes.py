"""Liveness and readiness: ``/healthz`` (the process answers), ``/readyz`` (a first snapshot is loaded)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.deps import deps_of


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    store = deps_of(request).store
    snapshot = store.snapshot
    if not store.ready:
        return JSONResponse({"status": "loading", "version": snapshot.version}, 503)
    return JSONResponse({"status": "ready", "version": snapshot.version, "flags": len(snapshot.flags)})


ROUTES = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET", "HEAD"]),
]
