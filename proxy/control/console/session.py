"""The console's sign-in: a signed session cookie, its CSRF token, and the same-origin check.

The cookie is ``v1.<expires>.<csrf>.<signature>``: HMAC-SHA256 over the rest and a fingerprint of
the admin token, keyed with ``[console] session_secret`` (or a key derived from the admin token when
that is unset, so every worker and instance accepts the same cookie). Changing the admin token ends
every session. The CSRF token lives inside the signed cookie and must come back with every write
(form field ``csrf`` or header ``X-CSRF-Token``): a signed double submit. Every write, and the
sign-in, must also come from the console's own origin (``Origin`` / ``Sec-Fetch-Site``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from proxy.config import Settings

COOKIE = "flagproxy_console"
VERSION = "v1"


@dataclass(frozen=True)
class Session:
    expires: int
    csrf: str


def signing_key(settings: Settings) -> bytes:
    secret = settings.console.session_secret
    if secret:
        return secret.encode()
    return hmac.new(settings.admin.token.encode(), b"flagproxy console session v1", hashlib.sha256).digest()


def _signature(settings: Settings, body: str) -> str:
    fingerprint = hashlib.sha256(settings.admin.token.encode()).hexdigest()[:16]
    message = f"{body}.{fingerprint}".encode()
    return hmac.new(signing_key(settings), message, hashlib.sha256).hexdigest()


def issue(settings: Settings, now: float | None = None) -> tuple[str, Session]:
    """A new session: the cookie value and what it holds."""
    expires = int(now if now is not None else time.time()) + settings.console.session_ttl_s
    csrf = secrets.token_urlsafe(24)
    body = f"{VERSION}.{expires}.{csrf}"
    return f"{body}.{_signature(settings, body)}", Session(expires, csrf)


def verify(settings: Settings, value: str, now: float | None = None) -> Session | None:
    """The session a cookie value holds, or None (forged, for another admin token, or expired)."""
    if not settings.admin.token:
        return None
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(parts[3].encode(), _signature(settings, body).encode()):
        return None
    expires = int(parts[1])
    if expires <= (now if now is not None else time.time()):
        return None
    return Session(expires, parts[2])


def token_matches(settings: Settings, given: str) -> bool:
    """The admin token, compared in constant time."""
    token = settings.admin.token
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def csrf_matches(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def cross_site(request: Request) -> str | None:
    """Why a write does not come from the console's own page, or None when it does.

    A browser says where a request comes from: ``Sec-Fetch-Site`` must be ``same-origin`` (or
    ``none``: typed by the user) and ``Origin``, when sent, must name this host. A client that sends
    neither (a script) is judged by its CSRF token alone."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"the request comes from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            return f"the request comes from another origin ({origin})"
    return None


def cookie_header(request: Request, prefix: str, value: str, max_age: int) -> str:
    """``Set-Cookie`` for the session (an empty value with ``max_age`` 0 removes it)."""
    secure = "; Secure" if request.url.scheme == "https" else ""
    return f"{COOKIE}={value}; Path={prefix}/console; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
