"""What every source's webhook shares: writing to the store, and counting the outcome."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.store.base import FlagStore, StoreTimeout, StoreUnavailable
from proxy.store.change import Change
from proxy.store.state import ApplyResult

Handler = Callable[[Request], Awaitable[Response]]


async def apply(store: FlagStore, change: Change) -> ApplyResult:
    """Write ``change``. A store that cannot take writes now is a 503, and nothing was applied; a
    write sent but not answered in time is a 504: it may have been applied (read it back)."""
    try:
        return await store.apply(change)
    except StoreUnavailable as exc:
        raise HTTPProblem(503, "store_unavailable", f"the flag store cannot take writes now: {exc}") from None
    except StoreTimeout as exc:
        raise HTTPProblem(
            504,
            "store_timeout",
            f"the flag store did not confirm the write in time ({exc}): it may or may not have been "
            "applied; read the flag back before retrying",
        ) from None


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


def counted(source: str) -> Callable[[Handler], Handler]:
    """Count the webhook's outcome (``flagproxy_webhooks_total{source,result}``):
    ``request.state.outcome`` on success, else the error code."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            metrics = deps_of(request).metrics
            try:
                response = await handler(request)
            except Exception as exc:
                metrics.webhook(source, exc.error if isinstance(exc, HTTPProblem) else "error")
                raise
            metrics.webhook(source, getattr(request.state, "outcome", "accepted"))
            return response

        return wrapped

    return wrap


def check_hmac_signature(secret: str, body: bytes, signature: str) -> None:
    """``sha256=<hex HMAC-SHA256 of the body>`` (X-Flagproxy-Signature), or 401."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.strip().lower().encode(), expected.encode()):
        raise HTTPProblem(401, "bad_signature", "X-Flagproxy-Signature is missing or does not match the body")
