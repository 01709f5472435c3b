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
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.dataplane.context import make_context
from proxy.dataplane.header_fit import RequiredFlagsDoNotFit


async def evaluate(request: Request) -> Response:
    deps = deps_of(request)
    settings = deps.settings
    params = request.query_params
    attributes: dict[str, Any] = {k[5:]: v for k, v in params.multi_items() if k.startswith("attr.")}
    path = params.get("path")
    if path is not None:
        attributes["path"] = path
    if "method" in params:
        attributes["method"] = params["method"]
    head = params.get("head_bytes", str(settings.header.typical_request_bytes))
    if not head.isdigit():
        raise HTTPProblem(400, "bad_head_bytes", "head_bytes must be a whole number of bytes")
    context = make_context(params.get("key"), attributes, params.get("bucketingKey"))
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
        for key in fitted.omitted_configs:
            flags[key]["omitted"] = "config"
        for key in fitted.omitted_values:
            flags[key]["omitted"] = "value"
        report["flag_header_bytes"] = fitted.size
        report["omitted"] = {"values": fitted.omitted_values, "configs": fitted.omitted_configs}
    body = {"version": snapshot.version, "context": context, "flags": flags, "header": report}
    return JSONResponse(body)


ROUTES = [Route("/evaluate", evaluate, methods=["GET"])]
