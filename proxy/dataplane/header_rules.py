"""Header rules as data: what never crosses the proxy, what the proxy sets, and the two rewrites.

Headers travel as the bytes they arrived as — names keep their case, fields keep their order — with
these exceptions, in both directions unless stated:

- Hop-by-hop headers (RFC 9110 §7.6.1) and every header a ``Connection`` header names are dropped;
  an upgrade keeps ``Upgrade`` and ``Connection: Upgrade``.
- Requests: ``X-Forwarded-*`` / ``Forwarded`` are kept only from trusted peers and the proxy adds its
  own; ``Via`` gets the proxy's hop; the flag header family is the proxy's (whatever a client sends
  under those names is dropped); ``X-Request-Id`` is the request's id; ``Expect`` is answered by the
  proxy unless ``[upstream] forward_expect``; ``TE: trailers`` survives as ``TE: trailers`` with
  ``Connection: TE``.
- Names containing ``_``: many origins (gunicorn, wsgiref, cheroot, PHP, CGI) read ``X_Feature_Flags``
  as ``X-Feature-Flags``, so such names are dropped by default (``[proxy] underscore_headers``:
  ``drop``, ``reject`` = 400, or ``pass``). Passed, a name still never reaches the origin when it
  reads as a header the proxy controls (flag headers, forwarding headers, ``Via``, ``X-Request-Id``,
  hop-by-hop ones) with ``_`` read as ``-``.
- Responses: the origin's ``X-Request-Id`` is replaced by the request's id.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from proxy.asgi import Header

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
DIGITS = re.compile(rb"[0-9]{1,18}")
UNDERSCORE_POLICIES = ("drop", "reject", "pass")
# what the proxy itself sets or removes: with ``_`` read as ``-`` a client may not send these
CONTROLLED: frozenset[bytes] = HOP_BY_HOP | FORWARDING | {b"via", b"x-request-id", b"host", b"expect"}


class BadRequest(Exception):
    """The request cannot be forwarded as it is; the message goes into the 400 body."""


def request_id_of(headers: list[Header]) -> str | None:
    """The client's first sane ``X-Request-Id`` (names lower case), else None."""
    for name, value in headers:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return None


def connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


@dataclass(frozen=True)
class RequestRules:
    """How a client's request head becomes the origin's (flag headers are added later, by the fit)."""

    is_reserved: Callable[[bytes], bool]  # the flag header family (lower-case names)
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    via_name: str = "flagproxy"
    forward_expect: bool = False
    underscores: str = "drop"  # [proxy] underscore_headers

    def underscore_name(self, name: bytes, low: bytes) -> bool:
        """Whether ``name`` (with a ``_``) is left out; ``reject`` raises ``BadRequest``."""
        if self.underscores == "pass":
            dashed = low.replace(b"_", b"-")
            return dashed in CONTROLLED or self.is_reserved(dashed)
        if self.underscores == "reject":
            shown = name[:64].decode("latin-1")
            raise BadRequest(f"header name {shown!r} contains '_' ([proxy] underscore_headers = \"reject\")")
        return True

    def is_trusted(self, client: str | None) -> bool:
        if not self.trusted or not client:
            return False
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def rewrite(
        self,
        headers: list[Header],
        lowered: list[bytes],
        client: str | None,
        version: bytes,
        netloc: bytes,
        rewrite_host: bool,
        request_id: bytes,
        upgrade: bytes | None,
    ) -> list[bytes]:
        """The origin's header lines (``Name: value\\r\\n``), in the client's order and spelling.

        ``headers`` as received, ``lowered`` their names in lower case, ``upgrade`` the protocol the
        client asks to switch to (it keeps ``Upgrade`` and gets ``Connection: Upgrade``).
        """
        drop = HOP_BY_HOP
        if b"connection" in lowered:
            values = [v for (_, v), n in zip(headers, lowered, strict=True) if n == b"connection"]
            named = connection_tokens(values)
            drop = HOP_BY_HOP | (named - {b"upgrade"} if upgrade is not None else named)
        trusted = self.is_trusted(client)
        reserved = self.is_reserved

        out: list[bytes] = []
        host_at = -1
        host = xff = xfp = xfh = via = None
        te_trailers = False
        for (name, value), low in zip(headers, lowered, strict=True):
            if low in drop:
                if low == b"te" and b"trailers" in value.lower():
                    te_trailers = True
                elif low == b"upgrade" and upgrade is not None:
                    out.append(name + b": " + value + b"\r\n")
                continue
            if reserved(low) or (b"_" in low and self.underscore_name(name, low)):
                continue
            if low == b"host":
                if host is not None:
                    raise BadRequest("more than one Host header")  # RFC 9112 §3.2
                host = value
                host_at = len(out)
                out.append(name + b": " + (netloc if rewrite_host else value) + b"\r\n")
            elif low in FORWARDING:
                if trusted:
                    if low == b"x-forwarded-for":
                        xff = value if xff is None else xff + b", " + value
                    elif low == b"x-forwarded-proto":
                        xfp = value
                    elif low == b"x-forwarded-host":
                        xfh = value
                    else:
                        out.append(name + b": " + value + b"\r\n")
            elif low == b"via":
                via = value if via is None else via + b", " + value
            elif low == b"expect":
                if self.forward_expect:
                    out.append(name + b": " + value + b"\r\n")
            elif low != b"x-request-id":
                out.append(name + b": " + value + b"\r\n")

        if host_at < 0:
            if version == b"1.1":
                raise BadRequest("an HTTP/1.1 request needs a Host header")  # RFC 9112 §3.2
            out.insert(0, b"Host: " + netloc + b"\r\n")  # the origin speaks HTTP/1.1
        if client:
            ip = client.encode("latin-1")
            xff = ip if xff is None else xff + b", " + ip
        if xff is not None:
            out.append(b"X-Forwarded-For: " + xff + b"\r\n")
        out.append(b"X-Forwarded-Proto: " + (xfp or b"http") + b"\r\n")
        if xfh is not None or host is not None:
            out.append(b"X-Forwarded-Host: " + (xfh or host or b"") + b"\r\n")
        if self.via_name:
            hop = version + b" " + self.via_name.encode("latin-1")
            out.append(b"Via: " + (via + b", " + hop if via else hop) + b"\r\n")
        if upgrade is not None:
            out.append(b"Connection: Upgrade\r\n")
        elif te_trailers:
            out.append(b"TE: trailers\r\nConnection: TE\r\n")
        # One id per request, the client's when it sent a sane one: passed on and returned.
        out.append(b"X-Request-Id: " + request_id + b"\r\n")
        return out


def response_lines(headers: list[Header], upgrade: bool) -> tuple[list[bytes], bytes | None, bool]:
    """The origin's response header lines minus hop-by-hop ones, those its ``Connection`` names and its
    ``X-Request-Id``; also its ``Content-Length`` (None when absent) and whether it is chunked.

    ``upgrade`` (a 101): ``Upgrade`` and ``Connection`` stay. A ``Content-Length`` that is not digits
    only, or two that differ, raise ``ValueError`` (RFC 9112 §6.3: the response is discarded, 502).
    """
    lowered = [name.lower() for name, _ in headers]
    named: set[bytes] = set()
    if b"connection" in lowered:
        named = connection_tokens(
            [v for (_, v), n in zip(headers, lowered, strict=True) if n == b"connection"]
        )
    if upgrade:
        named.discard(b"upgrade")
    out: list[bytes] = []
    length: bytes | None = None
    chunked = False
    for (name, value), low in zip(headers, lowered, strict=True):
        if low in HOP_BY_HOP or low in named:
            if low == b"transfer-encoding":
                chunked = True
            elif upgrade and low in (b"upgrade", b"connection"):
                out.append(name + b": " + value + b"\r\n")
            continue
        if low == b"content-length":
            if not DIGITS.fullmatch(value) or (length is not None and length != value):
                raise ValueError(f"invalid Content-Length {value[:40]!r}")
            if length is not None:
                continue  # an identical repeat: sent once
            length = value
        elif low == b"x-request-id":
            continue
        out.append(name + b": " + value + b"\r\n")
    return out, length, chunked
