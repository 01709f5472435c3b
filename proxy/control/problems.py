"""Errors of the control plane: raise ``HTTPProblem`` anywhere, one registered handler answers.

Every error is JSON ``{"error": <code>, "detail": <what is wrong>, ...}`` (``proxy.errors``), and a
handler that raises has changed nothing: handlers validate before they write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import error_body


class HTTPProblem(Exception):
    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra


def problem_response(status: int, error: str, detail: str, **extra: Any) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = error_body(error, detail, **extra)
    return Response(body, status, headers=headers, media_type="application/json")


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPProblem)
    return problem_response(exc.status, exc.error, exc.detail, **exc.extra)


async def on_not_found(request: Request, exc: Exception) -> Response:
    return problem_response(404, "not_found", f"no control endpoint {request.url.path}")


async def on_method_not_allowed(request: Request, exc: Exception) -> Response:
    return problem_response(405, "method_not_allowed", request.method)


EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # a disabled path's Route


def disabled(detail: str) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint for the paths of a feature that is off: 404 saying so and what turns it on."""

    async def endpoint(request: Request) -> Response:
        raise HTTPProblem(404, "not_found", detail)

    return endpoint


HANDLERS = {HTTPProblem: on_problem, 404: on_not_found, 405: on_method_not_allowed}
