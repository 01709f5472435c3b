"""Control plane under the reserved prefix (default ``/__flags``): Starlette, off the data path.

Every error is JSON ``{"error": <code>, "detail": <what is wrong>}`` and leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from proxy.config import header_budget
from proxy.engine import FlagError, compile_flag
from proxy.evaluate import make_context
from proxy.sources.change import Change, stored_text
from proxy.sources.native import change_from_payload, updated_at_ms
from proxy.store.base import StoreUnavailable
from proxy.store.state import OVERRIDES, PRECEDENCE, ApplyResult

if TYPE_CHECKING:
    from proxy.app import FlagProxy

Handler = Callable[[Request], Awaitable[Response]]


class HTTPProblem(Exception):
    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": self.error, "detail": self.detail, **self.extra}, self.status, headers)


def problem_handler(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPProblem as exc:
            return exc.response()

    return wrapped


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "payload_too_large", f"body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
        # "\ud800" parses, but is no text: Redis (and any UTF-8 consumer) cannot take it
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPProblem(
            400, "invalid_json", "body is not valid JSON: a string holds an unpaired UTF-16 surrogate"
        ) from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise HTTPProblem(400, "invalid_json", f"body is not valid JSON: {detail}") from None
    return value


def bearer_matches(request: Request, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def invalid_flags(exc: FlagError) -> HTTPProblem:
    return HTTPProblem(422, "invalid_flags", str(exc), field=exc.path)


def result_response(result: ApplyResult, status: int) -> JSONResponse:
    if result.status == "stale":
        raise HTTPProblem(
            409,
            "stale",
            f"version is not newer than the stored source version {result.stored_source_version}",
            stored_version=result.stored_source_version,
            version=result.version,
        )
    return JSONResponse(result.to_json(), status)


def build_control_app(proxy: FlagProxy) -> Starlette:
    settings = proxy.settings
    metrics = proxy.metrics

    def counted(source: str) -> Callable[[Handler], Handler]:
        """``problem_handler``, counting the webhook's outcome: ``request.state.outcome`` on success,
        else the error code."""

        def wrap(handler: Handler) -> Handler:
            async def wrapped(request: Request) -> Response:
                try:
                    response = await handler(request)
                except Exception as exc:
                    metrics.webhook(source, exc.error if isinstance(exc, HTTPProblem) else "error")
                    raise
                metrics.webhook(source, getattr(request.state, "outcome", "accepted"))
                return response

            return problem_handler(wrapped)

        return wrap

    async def apply(change: Change) -> ApplyResult:
        try:
            return await proxy.store.apply(change)
        except StoreUnavailable as exc:
            raise HTTPProblem(
                503, "store_unavailable", f"the flag store cannot take writes now: {exc}"
            ) from None

    # --- probes -----------------------------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        snapshot = proxy.store.snapshot
        if not proxy.store.ready:
            return JSONResponse({"status": "loading", "version": snapshot.version}, 503)
        return JSONResponse({"status": "ready", "version": snapshot.version, "flags": len(snapshot.flags)})

    # --- webhooks ---------------------------------------------------------------------------------

    @counted("native")
    async def native_webhook(request: Request) -> Response:
        secret = settings.webhooks.secret
        if not secret:
            raise HTTPProblem(404, "not_found", "the native webhook is disabled: set [webhooks] secret")
        body = await read_body(request, settings.webhooks.max_body_bytes)
        signature = request.headers.get("x-flagproxy-signature", "")
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.strip().lower().encode(), expected.encode()):
            raise HTTPProblem(
                401, "bad_signature", "X-Flagproxy-Signature is missing or does not match the body"
            )
        try:
            change = change_from_payload(parse_json(body), actor="webhook:native")
        except FlagError as exc:
            raise invalid_flags(exc) from None
        result = await apply(change)
        request.state.outcome = result.status
        return result_response(result, 202)

    @counted("split")
    async def split_webhook(request: Request) -> Response:
        """Split's audit-log webhook: authenticated by a shared token, answered at once, pulled later."""
        token = settings.split.webhook_token
        if not token:
            raise HTTPProblem(404, "not_found", "the Split webhook is disabled: set [split] webhook_token")
        given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPProblem(401, "bad_token", "the ?token= query parameter is missing or wrong")
        payload = parse_json(await read_body(request, settings.webhooks.max_body_bytes))
        if not isinstance(payload, dict):
            raise HTTPProblem(422, "invalid_payload", "expected a Split audit-log object")
        environment = payload.get("environmentName")
        allowed = settings.split.environments
        if allowed and environment not in allowed:
            request.state.outcome = "ignored"
            return JSONResponse({"status": "ignored", "detail": f"environment {environment!r} is not synced"})
        if not proxy.split.enabled:
            raise HTTPProblem(503, "split_disabled", "no [split] sdk_key is configured to pull definitions")
        proxy.split.trigger()
        return JSONResponse({"status": "accepted", "flag": payload.get("name")})

    # --- metrics ----------------------------------------------------------------------------------

    @problem_handler
    async def metrics_endpoint(request: Request) -> Response:
        token = settings.metrics.token
        if not settings.metrics.enabled:
            raise HTTPProblem(404, "not_found", "metrics are disabled: [metrics] enabled = false")
        if token and not bearer_matches(request, token):
            raise HTTPProblem(401, "unauthorized", "a valid metrics bearer token is required")
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"content-type": content_type})

    # --- admin API --------------------------------------------------------------------------------

    def admin(handler: Handler) -> Handler:
        @problem_handler
        async def guarded(request: Request) -> Response:
            token = settings.admin.token
            if not token:
                raise HTTPProblem(404, "not_found", f"no control endpoint {request.url.path}")
            if not bearer_matches(request, token):
                raise HTTPProblem(401, "unauthorized", "a valid admin bearer token is required")
            return await handler(request)

        return guarded

    def describe(key: str) -> dict[str, Any] | None:
        raw = proxy.store.snapshot.raw
        for source in reversed(PRECEDENCE):
            text = raw.items(source).get(key)
            if text is not None:
                out: dict[str, Any] = {"key": key, "source": source, "definition": json.loads(text)}
                override = raw.items(OVERRIDES).get(key)
                if override is not None:
                    out["override"] = json.loads(override)
                return out
        return None

    async def list_flags(request: Request) -> Response:
        snapshot = proxy.store.snapshot
        flags = {key: describe(key) for key in sorted(snapshot.flags)}
        return JSONResponse({"version": snapshot.version, "flags": flags})

    async def get_flag(request: Request) -> Response:
        found = describe(request.path_params["key"])
        if found is None:
            raise HTTPProblem(404, "unknown_flag", f"no flag {request.path_params['key']!r}")
        return JSONResponse({**found, "version": proxy.store.snapshot.version})

    async def put_flag(request: Request) -> Response:
        key = request.path_params["key"]
        definition = parse_json(await read_body(request, settings.webhooks.max_body_bytes))
        try:
            compile_flag(key, definition)
        except FlagError as exc:
            raise invalid_flags(exc) from None
        version = updated_at_ms(definition)
        change = Change(
            source="native",
            upsert={key: stored_text(definition)},
            item_versions={key: version} if version is not None else {},
            actor="admin",
        )
        return result_response(await apply(change), 200)

    async def delete_flag(request: Request) -> Response:
        key = request.path_params["key"]
        found = describe(key)
        if found is None:
            raise HTTPProblem(404, "unknown_flag", f"no flag {key!r}")
        if found["source"] != "native":
            raise HTTPProblem(409, "not_native", f"{key!r} comes from {found['source']}: change it there")
        result = await apply(Change(source="native", delete=[key], actor="admin"))
        if key in proxy.store.snapshot.raw.items(OVERRIDES):
            # A kill or promotion belongs to the flag: it must not come back with a new flag of that name.
            result = await apply(Change(source=OVERRIDES, delete=[key], actor="admin", action="restore"))
        return result_response(result, 200)

    async def kill_flag(request: Request) -> Response:
        key = request.path_params["key"]
        if key not in proxy.store.snapshot.flags:
            raise HTTPProblem(404, "unknown_flag", f"no flag {key!r}")
        change = Change(
            source=OVERRIDES, upsert={key: stored_text({"kill": True})}, actor="admin", action="kill"
        )
        return result_response(await apply(change), 200)

    async def promote_flag(request: Request) -> Response:
        key = request.path_params["key"]
        flag = proxy.store.snapshot.flags.get(key)
        if flag is None:
            raise HTTPProblem(404, "unknown_flag", f"no flag {key!r}")
        body = parse_json(await read_body(request, settings.webhooks.max_body_bytes))
        variant = body.get("variant") if isinstance(body, dict) else None
        if isinstance(variant, str) and isinstance(flag.default.value, bool) and variant in ("true", "false"):
            variant = variant == "true"
        if variant is None or flag.outcome(variant) is None:
            choices = ", ".join(json.dumps(s.value) for s in flag.served)
            raise HTTPProblem(422, "unknown_variant", f'body must be {{"variant": one of {choices}}}')
        change = Change(
            source=OVERRIDES, upsert={key: stored_text({"promote": variant})}, actor="admin", action="promote"
        )
        return result_response(await apply(change), 200)

    async def restore_flag(request: Request) -> Response:
        key = request.path_params["key"]
        change = Change(source=OVERRIDES, delete=[key], actor="admin", action="restore")
        return result_response(await apply(change), 200)

    async def evaluate(request: Request) -> Response:
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
        snapshot = proxy.store.snapshot
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
        origin = proxy.forwarder.router.match((path or "/").encode())
        budget = origin.budget if origin is not None else header_budget(settings)
        fitted = proxy.flag_headers.fit(resolved, budget - int(head))
        for key in fitted.omitted_configs:
            flags[key]["omitted"] = "config"
        for key in fitted.omitted_values:
            flags[key]["omitted"] = "value"
        report = {
            "budget": budget,
            "head_bytes": int(head),
            "flag_header_bytes": fitted.size,
            "omitted": {"values": fitted.omitted_values, "configs": fitted.omitted_configs},
        }
        body = {"version": snapshot.version, "context": context, "flags": flags, "header": report}
        return JSONResponse(body)

    async def audit(request: Request) -> Response:
        limit = request.query_params.get("limit", str(min(100, settings.store.audit_max)))
        if not limit.isdigit() or not 1 <= int(limit) <= settings.store.audit_max:
            raise HTTPProblem(400, "bad_limit", f"limit must be 1..{settings.store.audit_max}")
        try:
            entries = await proxy.store.audit(int(limit))
        except StoreUnavailable as exc:
            raise HTTPProblem(503, "store_unavailable", str(exc)) from None
        return JSONResponse({"entries": entries})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": f"no control endpoint {request.url.path}"}, 404)

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "method_not_allowed", "detail": request.method}, 405)

    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/webhooks/native", native_webhook, methods=["POST"]),
        Route("/webhooks/split", split_webhook, methods=["POST"]),
        Route("/api/flags", admin(list_flags), methods=["GET"]),
        Route("/api/flags/{key}", admin(get_flag), methods=["GET"]),
        Route("/api/flags/{key}", admin(put_flag), methods=["PUT"]),
        Route("/api/flags/{key}", admin(delete_flag), methods=["DELETE"]),
        Route("/api/flags/{key}/kill", admin(kill_flag), methods=["POST"]),
        Route("/api/flags/{key}/promote", admin(promote_flag), methods=["POST"]),
        Route("/api/flags/{key}/restore", admin(restore_flag), methods=["POST"]),
        Route("/api/evaluate", admin(evaluate), methods=["GET"]),
        Route("/api/audit", admin(audit), methods=["GET"]),
    ]
    return Starlette(
        routes=[Mount(settings.server.control_prefix, routes=routes)],
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
