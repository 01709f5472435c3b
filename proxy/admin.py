"""Control plane under the reserved prefix (default ``/__flags``): Starlette, off the data path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

if TYPE_CHECKING:
    from proxy.app import FlagProxy


def build_control_app(proxy: FlagProxy) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": f"no control endpoint {request.url.path}"}, 404)

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "method_not_allowed", "detail": request.method}, 405)

    routes = [Route("/healthz", healthz, methods=["GET", "HEAD"])]
    return Starlette(
        routes=[Mount(proxy.settings.server.control_prefix, routes=routes)],
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
