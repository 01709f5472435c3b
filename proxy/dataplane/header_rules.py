"""Header rules as data: what never crosses the proxy, what the proxy sets, and the two rewrites.

- Hop-by-hop headers (RFC 9110 §7.6.1) and every header a ``Connection`` header names are dropped in
  both directions.
- ``X-Forwarded-*`` / ``Forwarded`` are kept only from trusted peers; the proxy adds its own.
- The flag header family is the proxy's: whatever a client sends under those names is dropped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from proxy.asgi import Header, Scope

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Set by the proxy from what it saw; from an untrusted peer they are dropped, not passed on.
FORWARDING: frozenset[bytes] = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # anything else is replaced, never logged as sent


class BadRequest(Exception):
    """The request cannot be forwarded as it is; the message goes into the 400 body."""


def request_id_of(headers: list[Header]) -> str | None:
    """The client's first sane ``X-Request-Id``, else None."""
    for name, value in headers:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return None


def has_body(headers: list[Header]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() != b"0"
    return False


def connection_tokens(headers: list[Header]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def field_text(value: bytes) -> str:
    """Header fields go upstream as UTF-8, so decode them as UTF-8: the origin gets the client's bytes.

    Bytes that are not UTF-8 (obs-text) could not reach the origin unchanged, so such a request is
    refused (400) rather than forwarded altered.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a header value is not valid UTF-8") from None


@dataclass(frozen=True)
class RequestRules:
    """How a client's request head becomes the origin's (flag headers are added later, by the fit)."""

    is_reserved: Callable[[bytes], bool]  # the flag header family
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    via_name: str = "flagproxy"

    def is_trusted(self, client: tuple[str, int] | None) -> bool:
        if not self.trusted or not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def rewrite(
        self, scope: Scope, netloc: bytes, rewrite_host: bool, request_id: str
    ) -> list[tuple[str, str]]:
        """Incoming headers minus hop-by-hop and reserved ones, plus forwarding info and the request id."""
        incoming: list[Header] = scope["headers"]
        drop = HOP_BY_HOP
        if any(n == b"connection" for n, _ in incoming):
            drop = HOP_BY_HOP | connection_tokens(incoming)
        trusted = self.is_trusted(scope.get("client"))
        reserved = self.is_reserved

        out: list[tuple[str, str]] = []
        host = xff = xfp = xfh = via = None
        te_trailers = False
        for name, value in incoming:
            if name in drop:
                if name == b"te" and b"trailers" in value.lower():
                    te_trailers = True
                continue
            if reserved(name):
                continue
            if name == b"host":
                if host is not None:
                    raise BadRequest("more than one Host header")  # RFC 9112 §3.2
                host = value
            elif name in FORWARDING:
                if trusted:
                    if name == b"x-forwarded-for":
                        xff = value if xff is None else xff + b", " + value
                    elif name == b"x-forwarded-proto":
                        xfp = value
                    elif name == b"x-forwarded-host":
                        xfh = value
                    else:
                        out.append(("forwarded", field_text(value)))
            elif name == b"via":
                via = value if via is None else via + b", " + value
            elif name != b"x-request-id":
                out.append((name.decode("latin-1"), field_text(value)))

        if host is None and scope.get("http_version") == "1.1":
            raise BadRequest("an HTTP/1.1 request needs a Host header")  # RFC 9112 §3.2
        outgoing_host = netloc if rewrite_host or host is None else host
        out.insert(0, ("Host", field_text(outgoing_host)))
        client = scope.get("client")
        if client:
            ip = client[0].encode("latin-1")
            xff = ip if xff is None else xff + b", " + ip
        if xff is not None:
            out.append(("X-Forwarded-For", field_text(xff)))
        out.append(("X-Forwarded-Proto", field_text(xfp or scope.get("scheme", "http").encode())))
        if xfh is not None or host is not None:
            out.append(("X-Forwarded-Host", field_text(xfh or host or b"")))
        if self.via_name:
            hop = f"{scope.get('http_version', '1.1')} {self.via_name}"
            out.append(("Via", f"{field_text(via)}, {hop}" if via else hop))
        if te_trailers:
            out.append(("TE", "trailers"))
            out.append(("Connection", "TE"))
        # One id per request, the client's when it sent a sane one: passed on and returned.
        out.append(("X-Request-Id", request_id))
        return out


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[Header]:
    """The origin's headers, lower-cased, minus hop-by-hop ones and those its Connection names,
    and minus its X-Request-Id: the client gets the id the origin was sent (and the logs show)."""
    out = []
    connection = None
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lname == b"x-request-id":
            continue
        out.append((lname, value))
    if connection is not None:
        named = connection_tokens([(b"connection", connection)])
        out = [h for h in out if h[0] not in named]
    return out
