"""``GET /__flags/api/evaluate``: each flag's value for a caller and why, and what the budget would drop.

It uses the data plane's own pieces: the snapshot's flags, the router (which origin and budget serve
the path) and the header fitter — so the preview is what a request would really get.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.config import header_budget
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.problems import HTTPProblem
from proxy.dataplane.context import make_context
from proxy.dataplane.header_fit import RequiredFlagsDoNotFit


async def evaluate(request: Request) -> Response:
    deps = deps_of(request)
    params = request.query_params
    attributes: dict[str, Any] = {k[5:]: v for k, v in params.multi_items() if k.startswith("attr.")}
    head = params.get("head_bytes", str(deps.settings.header.typical_request_bytes))
    body = preview(
        deps,
        params.get("key"),
        attributes,
        params.get("path"),
        params.get("method"),
        head,
        params.get("bucketingKey"),
    )
    return JSONResponse(body)


def preview(
    deps: ControlDeps,
    key: str | None,
    attributes: dict[str, Any],
    path: str | None,
    method: str | None,
    head: str,
    bucketing_key: str | None = None,
) -> dict[str, Any]:
    """What a request would get (the admin API's evaluate, the console's Evaluate form); 400 for a
    ``head`` that is not a whole number of bytes."""
    settings = deps.settings
    attributes = dict(attributes)
    if path is not None:
        attributes["path"] = path
    if method is not None:
        attributes["method"] = method
    if not head.isdigit():
        raise HTTPProblem(400, "bad_head_bytes", "head_bytes must be a whole number of bytes")
    context = make_context(key, attributes, bucketing_key)
    snapshot = deps.store.snapshot
    flags = {}
    resolved = []
    for flag in snapshot.ordered:
        if path is not None and not flag.applies_to(path):
            continue
        served, why = flag.explain(context)
        resolved.append((flag, served))
        flags[flag.key] = {"value": served.value, **why}
        if served.config_json is not None:
            flags[flag.key]["config"] = served.config
    # What the header budget would leave out for a request of ``head_bytes`` to this path.
    origin = deps.router.match((path or "/").encode())
    budget = origin.budget if origin is not None else header_budget(settings)
    report: dict[str, Any] = {"budget": budget, "head_bytes": int(head)}
    try:
        fitted = deps.flag_headers.fit(resolved, budget - int(head))
    except RequiredFlagsDoNotFit as exc:  # the proxy would refuse such a request
        report["refused"] = {"status": 431, "error": "required_flags_do_not_fit", "detail": str(exc)}
    else:
        for flag_key in fitted.omitted_configs:
            flags[flag_key]["omitted"] = "config"
        for flag_key in fitted.omitted_values:
            flags[flag_key]["omitted"] = "value"
        report["flag_header_bytes"] = fitted.size
        report["omitted"] = {"values": fitted.omitted_values, "configs": fitted.omitted_configs}
    return {"version": snapshot.version, "context": context, "flags": flags, "header": report}


ROUTES = [Route("/evaluate", evaluate, methods=["GET"])]
