"""``GET /__flags/metrics``: the Prometheus exposition (``[metrics] enabled``, optional bearer token)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.control.auth import bearer_matches
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem


async def metrics_endpoint(request: Request) -> Response:
    deps = deps_of(request)
    settings = deps.settings.metrics
    if not settings.enabled:
        raise HTTPProblem(404, "not_found", "metrics are disabled: [metrics] enabled = false")
    if settings.token and not bearer_matches(request.headers.get("authorization", ""), settings.token):
        raise HTTPProblem(401, "unauthorized", "a valid metrics bearer token is required")
    body, content_type = deps.metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})


ROUTES = [Route("/metrics", metrics_endpoint, methods=["GET"])]
