"""What every source's webhook shares: writing to the store, counting the outcome, signatures."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.store.base import FlagStore, StoreTimeout, StoreUnavailable
from proxy.store.change import Change
from proxy.store.state import ApplyResult

log = logging.getLogger("flagproxy.webhooks")

Handler = Callable[[Request], Awaitable[Response]]


async def apply(store: FlagStore, change: Change) -> ApplyResult:
    """Write ``change``. A store that cannot take writes now is a 503, and nothing was applied; a
    write sent but not answered in time is a 504: it may have been applied (read it back)."""
    try:
        return await store.apply(change)
    except StoreUnavailable as exc:  # the why (with Redis's address) is for the log, not the caller
        log.warning("write refused: the flag store cannot take writes now: %s", exc)
        raise HTTPProblem(
            503,
            "store_unavailable",
            "the flag store cannot take writes now (Redis unavailable); nothing was applied",
        ) from None
    except StoreTimeout as exc:
        log.warning("write unconfirmed: %s", exc)
        raise HTTPProblem(
            504,
            "store_timeout",
            "the flag store did not confirm the write in time: it may or may not have been applied; "
            "read the flag back before retrying",
        ) from None


def result_response(result: ApplyResult, status: int) -> JSONResponse:
    """The answer for an applied (or unchanged) write; stale and versionless writes are 409,
    a delivery already applied is ``200 {"status": "duplicate"}``."""
    if result.status == "stale":
        raise HTTPProblem(
            409,
            "stale",
            f"version is not newer than the stored source version {result.stored_source_version}",
            stored_version=result.stored_source_version,
            version=result.version,
        )
    if result.status == "version_required":
        raise HTTPProblem(
            409,
            "version_required",
            f'a whole document without a "version" cannot replace versioned flags: the stored source '
            f"version is {result.stored_source_version}; send a newer one",
            stored_version=result.stored_source_version,
            version=result.version,
        )
    if result.status == "duplicate":
        return JSONResponse(result.to_json(), 200)
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


TOLERANCE_S = 300  # a signature's t may be this far from the proxy's clock, either way
MAX_SIGNATURE_PARTS = 16
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
DELIVERY_HEADER = "x-flagproxy-delivery"
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: it becomes part of a store key


@dataclass(frozen=True)
class Signed:
    """What a verified signature vouches for."""

    at_ms: int  # when the change was made: the signed t (a legacy signature: when it arrived)
    window_s: int  # how long the same request could still be accepted (its delivery id is kept so long)


def _unauthorized(detail: str, error: str = "bad_signature") -> HTTPProblem:
    return HTTPProblem(401, error, detail)


def _legacy(secret: str, body: bytes, header: str, now: float) -> Signed:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(header.lower().encode(), expected.encode()):
        raise _unauthorized("X-Flagproxy-Signature does not match the body")
    return Signed(at_ms=int(now) * 1000, window_s=TOLERANCE_S)


def check_signature(secret: str, body: bytes, header: str, *, legacy: bool, now: float) -> Signed:
    """``X-Flagproxy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, or 401.

    Stripe's scheme: any of several ``v1`` values may match (secret rotation), other schemes are
    ignored, and ``t`` must be within ``TOLERANCE_S`` of ``now``, so a captured request stops
    working. The old body-only ``sha256=<hex>`` form binds no time; it is accepted only with
    ``legacy`` (``[webhooks] legacy_signatures``).
    """
    header = header.strip()
    if not header:
        raise _unauthorized("X-Flagproxy-Signature is missing: sign t=<unix seconds>,v1=<hex>")
    if header.lower().startswith("sha256="):
        if legacy:
            return _legacy(secret, body, header, now)
        raise _unauthorized(
            "the body-only sha256= signature is refused (it can be replayed): sign "
            "t=<unix seconds>,v1=<hex HMAC-SHA256 of <t>.<body>>, or set [webhooks] legacy_signatures"
        )
    parts = header.split(",")
    if len(parts) > MAX_SIGNATURE_PARTS:
        raise _unauthorized(f"X-Flagproxy-Signature has more than {MAX_SIGNATURE_PARTS} parts")
    stamps, candidates = [], []
    for part in parts:
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name == "t":
            stamps.append(value)
        elif name == "v1":
            candidates.append(value.lower())
    if len(stamps) != 1 or not _TIMESTAMP.fullmatch(stamps[0]) or not candidates:
        raise _unauthorized("X-Flagproxy-Signature is malformed: expected t=<unix seconds>,v1=<hex>")
    stamp = stamps[0]
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest().encode()
    matches = [hmac.compare_digest(c.encode(), expected) for c in candidates]  # every one, in constant time
    if not any(matches):
        raise _unauthorized("X-Flagproxy-Signature does not match the timestamp and body")
    skew = now - int(stamp)
    if abs(skew) > TOLERANCE_S:
        raise _unauthorized(
            f"X-Flagproxy-Signature t={stamp} is {abs(skew):.0f} s {'old' if skew > 0 else 'ahead'} "
            f"(tolerance {TOLERANCE_S} s): a replayed request, or a clock is off",
            "signature_expired",
        )
    return Signed(at_ms=int(stamp) * 1000, window_s=TOLERANCE_S + max(0, math.ceil(-skew)))


def delivery_id(request: Request) -> str:
    """``X-Flagproxy-Delivery`` (optional): 1..128 visible ASCII characters, or 400."""
    value = request.headers.get(DELIVERY_HEADER)
    if value is None:
        return ""
    if not _DELIVERY_ID.fullmatch(value):
        raise HTTPProblem(
            400, "bad_delivery_id", "X-Flagproxy-Delivery must be 1..128 visible ASCII characters"
        )
    return value
