"""Differential tests: the same raw HTTP/1.x requests through nginx ``proxy_pass`` and through flagproxy.

Every case of ``CASES`` is played three times, each on a fresh client connection and against its own
``RawOrigin`` (which records the exact bytes it receives and answers with scripted raw bytes):

- **direct**: the client talks to the origin itself (what the client sent / what the origin answered);
- **nginx**: through a private nginx (``proxy_pass``, configured to change as little as it can);
- **flagproxy**: through ``flagproxy serve``.

Both sides are compared. What the origin received: request line, header fields (name case, order,
value bytes), framing, body. What the client received: interim (1xx) responses, status line with its
reason phrase, header fields, framing, body, whether the connection stays open, bytes through a
tunnel, and (when it stays open) that one more request on it is answered as itself. nginx and flagproxy
must agree modulo the differences below and nothing else. In every case flagproxy is also held to its
own promise against *direct*: apart from the documented additions (and its own ``Transfer-Encoding:
chunked``), every field it passes on is one of the input's, byte for byte, in the input's order.

The table of differences, ``DIFFERENCES`` in code (a test keeps the two in step). "extra": only that
proxy sends these fields; they are left out of its view, and only when their value matches the
pattern. "no oracle": nginx is no reference for this aspect; it is left out of the nginx comparison
and flagproxy's is compared with *direct*. "closes": flagproxy ends the connection where nginx goes
on; such cases are compared with *direct* and flagproxy must close.

=========================  =====  ======  =========  =====================================================
key                        proxy  side    effect     what (verdict)
=========================  =====  ======  =========  =====================================================
fp-forwarding              fp     origin  extra      X-Forwarded-For 127.0.0.1, X-Forwarded-Proto http,
                                                     X-Forwarded-Host <client's Host>, Via 1.x flagproxy
                                                     (flagproxy, documented)
fp-request-id              fp     origin  extra      X-Request-Id <16 hex> (flagproxy, documented)
fp-flag-headers            fp     origin  extra      x-feature-flags {"diff-on":true} (flagproxy, doc.)
fp-te-trailers             fp     origin  extra      ``TE: trailers`` + ``Connection: TE``, at the end,
                                                     when the client sent TE: trailers (flagproxy, doc.;
                                                     nginx clears TE)
fp-upgrade-connection      fp     origin  extra      ``Connection: Upgrade`` at the end of an upgrade
                                                     request (flagproxy, documented)
fp-response-request-id     fp     client  extra      X-Request-Id <16 hex> (flagproxy, documented)
fp-anonymous-cookie        fp     client  extra      set-cookie: flag_uid=<32 hex>; Path=/; Max-Age=...
                                                     (sticky anonymous id; flagproxy, documented)
fp-connection              fp     client  extra      its own Connection: close / keep-alive (HTTP/1.0);
                                                     compared as "persistent" instead
fp-refused-upgrade-closes  fp     client  closes     after a refused upgrade (no 101) flagproxy closes;
                                                     bytes after the Upgrade head are dropped, never
                                                     read as a request (flagproxy, by design; nginx
                                                     parses them as the next request)
nginx-flag-headers         nginx  origin  extra      client-sent X-Feature-Flags* (flagproxy documents
                                                     dropping them: clients cannot inject flags)
nginx-hop-by-hop           nginx  origin  extra      Proxy-Connection, Trailer, Proxy-Authorization and
                                                     fields the client's Connection names are relayed
                                                     (nginx quirk; RFC 9110 7.6.1 drops them)
nginx-connection           nginx  client  extra      Connection: keep-alive / close / upgrade on every
                                                     response (nginx style; compared as "persistent")
nginx-response-hop-by-hop  nginx  client  extra      Proxy-Authenticate, Proxy-Connection, Trailer and
                                                     fields the origin's Connection names are relayed
                                                     (nginx quirk)
nginx-host                 nginx  origin  no oracle  ``proxy_set_header Host $http_host``: ``Host``,
                                                     spelled so and first (nginx config)
nginx-upgrade              nginx  origin  no oracle  Upgrade / Connection of an upgrade are
                                                     ``proxy_set_header`` lines, first (nginx config)
nginx-request-framing      nginx  origin  no oracle  framing: CL/TE moved after Host; a chunked body
                                                     read whole with the head goes out with
                                                     Content-Length (``0\\r\\n\\r\\n`` -> Content-Length: 0)
                                                     (nginx quirk)
nginx-date-server          nginx  client  no oracle  the origin's Date and Server are replaced by
                                                     nginx's own (nginx quirk)
nginx-known-response       nginx  client  no oracle  Content-Type re-spelled and moved first (nginx
                                                     quirk: it regenerates the fields it knows)
nginx-tunnel-half-close    nginx  client  no oracle  nginx ends a tunnel at the client's half-close;
                                                     such cases run against direct (nginx quirk)
nginx-1xx                  nginx  client  no oracle  nginx 1.22 relays no 1xx: it takes a 103 as the
                                                     final response, the origin's 200 as its body;
                                                     such cases run against direct (nginx quirk)
=========================  =====  ======  =========  =====================================================

nginx configuration (``NGINX_CONF``): ``proxy_http_version 1.1; proxy_set_header Connection "";
proxy_set_header Host $http_host; proxy_pass_request_headers on; proxy_request_buffering off;
proxy_buffering off;``, a keep-alive ``upstream`` (``keepalive 16``), ``proxy_ignore_client_abort on``
(without it nginx drops a half-closed client: "client prematurely closed connection", no answer), and
an ``/upgrade-`` location with the usual ``Upgrade``/``Connection`` lines (nginx forwards no upgrade
otherwise). What both do alike needs no row: neither forwards ``Expect`` (each answers ``100 Continue``
itself), ``Keep-Alive``, other ``TE`` values, ``Upgrade`` without an upgrade, or the client's
``Connection``; both speak HTTP/1.1 upstream and to the client, keep reason phrases, re-chunk a
close-delimited response for HTTP/1.1 clients and close-delimit a chunked one for HTTP/1.0 clients.

Regression cases for flagproxy bugs this suite found (fixed in the data plane while it was written;
``Case.bug`` makes a case a strict xfail with its reason): ``pipelined-after-close`` and
``http10-pipelined`` (bytes after a closing request turned its answer into a 400),
``upgrade-refused-then-pipelined`` (after a refused upgrade the next request reached the origin
unparsed, spoofed flag headers included), ``upgrade-early-data-half-close`` (a half-close before the
upstream connection was up was lost; the tunnel never ended).

``test_flagproxy_never_desyncs`` (flagproxy only, no nginx) feeds random valid framings, pipelines of
1-3 requests and send split points, and checks that nothing is lost, duplicated or reordered.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    LOCALHOST,
    REPO,
    OriginConnection,
    ProxyProcess,
    RawOrigin,
    RecordedRequest,
    SocketReader,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

IO_TIMEOUT = 5.0  # every socket read; a proxy that stops answering fails the case, it does not hang
FLAGS = {"flags": {"diff-on": {"enabled": True}}}
FLAG_HEADER = '{"diff-on":true}'
FLAGPROXY, NGINX, DIRECT = "flagproxy", "nginx", "direct"
ORIGIN, CLIENT = "origin", "client"  # what the origin received / what the client received
EXTRA, NO_ORACLE, CLOSES = "extra", "no oracle", "closes"
NAMED_BY_CONNECTION = "<named by Connection>"  # stands for the fields a Connection header names
FRAMING = frozenset({"content-length", "transfer-encoding"})  # compared as "framing", not as fields
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)


# --- the difference table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One documented difference between what nginx and flagproxy deliver.

    ``effect`` EXTRA: only ``proxy`` sends the ``fields`` (on ``side``): a field whose lower-case name
    matches (``name*`` is a prefix, ``NAMED_BY_CONNECTION`` any field the input's Connection names)
    and whose whole value matches the regex (``{host}``: the client's Host; "" = any value) is left
    out of that proxy's view. Anything else under that name stays and shows up as a difference.
    ``effect`` NO_ORACLE: nginx is no reference for these field names (or for ``aspect``): they are
    left out of both views, and flagproxy's are compared with what the input (direct) had.
    ``effect`` CLOSES: flagproxy ends the connection after such an exchange where nginx goes on; the
    cases naming it are compared with direct, and flagproxy must close (nothing after it answered).
    """

    key: str
    proxy: str
    side: str
    effect: str
    fields: tuple[tuple[str, str], ...] = ()  # (name, value regex)
    aspect: str = "fields"  # "fields", or "framing" / "interim" / "tunnel" / "persistent"
    verdict: str = ""
    note: str = ""

    def matches(self, name: bytes, value: bytes, ctx: Context) -> bool:
        low = lname(name)
        named = connection_named(ctx.input.fields) - {"upgrade"}  # an upgrade keeps its Upgrade
        for pattern_name, pattern in self.fields:
            if pattern_name == NAMED_BY_CONNECTION:
                hit = low in named
            elif pattern_name.endswith("*"):
                hit = low.startswith(pattern_name[:-1])
            else:
                hit = low == pattern_name
            regex = pattern.replace("{host}", re.escape(ctx.host))
            if hit and (not regex or re.fullmatch(regex, value.decode("latin-1"))):
                return True
        return False


ANY = ""
DIFFERENCES: tuple[Difference, ...] = (
    # flagproxy's documented additions and removals
    Difference(
        "fp-forwarding",
        FLAGPROXY,
        ORIGIN,
        EXTRA,
        (
            ("x-forwarded-for", r"127\.0\.0\.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "{host}"),
            ("via", r"1\.[01] flagproxy"),
        ),
        verdict="flagproxy, documented",
        note="its forwarding fields, after the client's (no trusted peers configured)",
    ),
    Difference(
        "fp-request-id",
        FLAGPROXY,
        ORIGIN,
        EXTRA,
        (("x-request-id", "[0-9a-f]{16}"),),
        verdict="flagproxy, documented",
        note="one id per request, also returned to the client",
    ),
    Difference(
        "fp-flag-headers",
        FLAGPROXY,
        ORIGIN,
        EXTRA,
        (("x-feature-flags", re.escape(FLAG_HEADER)),),
        verdict="flagproxy, documented",
        note="the resolved flags; only diff-on is defined, so never -Config or -Omitted",
    ),
    Difference(
        "fp-te-trailers",
        FLAGPROXY,
        ORIGIN,
        EXTRA,
        (("te", "trailers"), ("connection", "TE")),
        verdict="flagproxy, documented",
        note="TE: trailers survives, with its own Connection: TE, both at the end; nginx clears TE",
    ),
    Difference(
        "fp-upgrade-connection",
        FLAGPROXY,
        ORIGIN,
        EXTRA,
        (("connection", "Upgrade"),),
        verdict="flagproxy, documented",
        note="an upgrade keeps Upgrade in place and gets the proxy's Connection: Upgrade at the end",
    ),
    Difference(
        "fp-response-request-id",
        FLAGPROXY,
        CLIENT,
        EXTRA,
        (("x-request-id", "[0-9a-f]{16}"),),
        verdict="flagproxy, documented",
    ),
    Difference(
        "fp-anonymous-cookie",
        FLAGPROXY,
        CLIENT,
        EXTRA,
        (("set-cookie", "flag_uid=[0-9a-f]{32}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"),),
        verdict="flagproxy, documented",
        note="a caller without a key gets a sticky anonymous id",
    ),
    Difference(
        "fp-connection",
        FLAGPROXY,
        CLIENT,
        EXTRA,
        (("connection", "close|keep-alive|Upgrade"),),
        verdict="flagproxy, its own connection management",
        note="compared as 'persistent' instead (Upgrade: the origin's, relayed with a 101)",
    ),
    Difference(
        "fp-refused-upgrade-closes",
        FLAGPROXY,
        CLIENT,
        CLOSES,
        aspect="persistent",
        verdict="flagproxy, by design (ProxyExchange.upgrading)",
        note="bytes after an Upgrade head are held until a 101 and dropped without one: the origin "
        "never reads them as a request; nginx parses them as the next request",
    ),
    Difference(
        "nginx-flag-headers",
        NGINX,
        ORIGIN,
        EXTRA,
        (("x-feature-flags*", ANY),),
        verdict="flagproxy, documented",
        note="flagproxy drops every client-sent X-Feature-Flags*; nginx relays them",
    ),
    # nginx: its quirks and its configuration
    Difference(
        "nginx-hop-by-hop",
        NGINX,
        ORIGIN,
        EXTRA,
        (
            ("proxy-connection", ANY),
            ("trailer", ANY),
            ("proxy-authorization", ANY),
            (NAMED_BY_CONNECTION, ANY),
        ),
        verdict="nginx quirk",
        note="RFC 9110 7.6.1 drops them; nginx clears only Connection, Keep-Alive, TE, Expect, Upgrade",
    ),
    Difference(
        "nginx-connection",
        NGINX,
        CLIENT,
        EXTRA,
        (("connection", "keep-alive|close|upgrade"),),
        verdict="nginx style",
        note="on every response; compared as 'persistent' instead",
    ),
    Difference(
        "nginx-response-hop-by-hop",
        NGINX,
        CLIENT,
        EXTRA,
        (
            ("proxy-authenticate", ANY),
            ("proxy-connection", ANY),
            ("trailer", ANY),
            (NAMED_BY_CONNECTION, ANY),
        ),
        verdict="nginx quirk",
        note="RFC 9110 7.6.1: hop-by-hop response fields are not relayed",
    ),
    Difference(
        "nginx-host",
        NGINX,
        ORIGIN,
        NO_ORACLE,
        (("host", ANY),),
        verdict="nginx config",
        note="proxy_set_header Host $http_host writes 'Host' first, whatever the client's spelling/place",
    ),
    Difference(
        "nginx-upgrade",
        NGINX,
        ORIGIN,
        NO_ORACLE,
        (("upgrade", ANY), ("connection", ANY)),
        verdict="nginx config",
        note="the /upgrade- location sets Upgrade and Connection with proxy_set_header (first)",
    ),
    Difference(
        "nginx-request-framing",
        NGINX,
        ORIGIN,
        NO_ORACLE,
        aspect="framing",
        verdict="nginx quirk",
        note="CL/TE moved after Host; a chunked body read whole with the head is sent with Content-Length",
    ),
    Difference(
        "nginx-date-server",
        NGINX,
        CLIENT,
        NO_ORACLE,
        (("date", ANY), ("server", ANY)),
        verdict="nginx quirk",
        note="nginx hides the origin's Date and Server and sends its own",
    ),
    Difference(
        "nginx-known-response",
        NGINX,
        CLIENT,
        NO_ORACLE,
        (("content-type", ANY),),
        verdict="nginx quirk",
        note="nginx regenerates Content-Type (its spelling, its place)",
    ),
    Difference(
        "nginx-tunnel-half-close",
        NGINX,
        CLIENT,
        NO_ORACLE,
        aspect="tunnel",
        verdict="nginx quirk",
        note="nginx ends a tunnel when the client half-closes it; such cases are compared with direct",
    ),
    Difference(
        "nginx-1xx",
        NGINX,
        CLIENT,
        NO_ORACLE,
        aspect="interim",
        verdict="nginx quirk",
        note="nginx 1.22 takes a 103 as the final response; such cases are compared with direct",
    ),
)
DIFFERENCE = {d.key: d for d in DIFFERENCES}


def rows(proxy: str, side: str, effect: str) -> list[Difference]:
    return [d for d in DIFFERENCES if d.proxy == proxy and d.side == side and d.effect == effect]


def no_oracle_names(side: str) -> frozenset[str]:
    return frozenset(n for d in rows(NGINX, side, NO_ORACLE) for n, _ in d.fields)


def no_oracle_aspects(side: str) -> frozenset[str]:
    return frozenset(d.aspect for d in rows(NGINX, side, NO_ORACLE) if d.aspect != "fields")


# --- messages as observed ----------------------------------------------------------------------------

Field = tuple[bytes, bytes]


def lname(name: bytes) -> str:
    return name.decode("latin-1").lower()


def connection_named(fields: Sequence[Field]) -> set[str]:
    named: set[str] = set()
    for name, value in fields:
        if lname(name) == "connection":
            named.update(t.strip().lower() for t in value.decode("latin-1").split(",") if t.strip())
    return named


@dataclass
class Message:
    """One request (as the origin got it) or one response (as the client got it)."""

    start: bytes  # request line / status line
    fields: list[Field]
    body: bytes = b""  # de-chunked
    framing: str = "none"  # "length N", "chunked", "close" (response ended by the close) or "none"
    interim: list[Message] = field(default_factory=list)  # 1xx heads received before a response

    @property
    def status(self) -> int:
        return int(self.start.split(b" ", 2)[1])

    def persistent(self, client_version: bytes) -> bool:
        tokens = connection_named(self.fields)
        return "keep-alive" in tokens if client_version == b"1.0" else "close" not in tokens


def from_recorded(request: RecordedRequest) -> Message:
    framing = "chunked" if request.chunked else "none"
    for name, value in request.headers:
        if lname(name) == "content-length":
            framing = f"length {value.decode('latin-1')}"
    assert request.complete, f"the origin got an incomplete body: {request.head!r}"
    return Message(request.request_line, list(request.headers), request.body or b"", framing)


class Reader(SocketReader):
    """Reads responses off one client socket as ``Message``s, keeping what is left over for the next."""

    def rest(self) -> bytes:
        """Everything until the peer closes (or resets)."""
        with contextlib.suppress(ConnectionError):
            return super().rest()
        data, self.buffer = self.buffer, b""
        return data

    def head(self) -> tuple[bytes, list[Field]]:
        lines = self.until(b"\r\n\r\n")[:-4].split(b"\r\n")
        fields = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
        return lines[0], fields

    def response(self, method: bytes, stop_at_interim: bool = False) -> Message:
        """One response; 1xx heads before it go to ``interim`` (a 101 is final)."""
        interim: list[Message] = []
        while True:
            start, fields = self.head()
            message = Message(start, fields)
            if 100 <= message.status < 200 and message.status != 101:
                if stop_at_interim:
                    return message
                interim.append(message)
                continue
            break
        message.interim = interim
        lowered = {lname(n): v for n, v in fields}
        if method == b"HEAD" or message.status in (101, 204, 304):
            return message
        if b"chunked" in lowered.get("transfer-encoding", b"").lower():
            message.framing = "chunked"
            message.body = self.chunked_body()
        elif "content-length" in lowered:
            message.framing = f"length {lowered['content-length'].decode('latin-1')}"
            message.body = self.exactly(int(lowered["content-length"]))
        else:
            message.framing = "close"
            message.body = self.rest()
        return message


# --- origin replies ------------------------------------------------------------------------------------


async def echo(request: RecordedRequest, conn: OriginConnection) -> None:
    """200 whose body names the request (so pipelined answers can be told apart)."""
    body = b"%s %s %d" % (request.method.encode(), request.target, request.body_length)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    await conn.send(head if request.method == "HEAD" else head + body)


async def close_delimited(request: RecordedRequest, conn: OriginConnection) -> None:
    """An HTTP/1.0-style origin: no length, the body ends when the connection does."""
    conn.write(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nX-Old-Style: 1\r\n\r\nthe body ends at the close"
    )
    conn.writer.close()  # flushes what is buffered, then closes
    with contextlib.suppress(OSError):
        await conn.writer.wait_closed()
    conn.close_after = True


UPGRADE_PAYLOAD = b"\x81\x04ping"


async def upgrade_echo(request: RecordedRequest, conn: OriginConnection) -> None:
    """101, then every byte back upper-cased (byte by byte: however TCP splits it) until EOF."""
    await conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    while data := await conn.reader.read(65536):
        await conn.send(data.upper())
    conn.close_after = True


async def refuse_upgrades(request: RecordedRequest, conn: OriginConnection) -> None:
    """An origin that ignores Upgrade (RFC 9110 7.8 allows it) and answers in HTTP/1.1."""
    if request.value("Upgrade") is None:
        await echo(request, conn)
        return
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nno upgrade")


WEBSOCKET = (
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
)


def raw(status_line: bytes, fields: Sequence[tuple[str, str]] = (), body: bytes = b"", length: bool = True):
    lines = [status_line] + [f"{n}: {v}".encode("latin-1") for n, v in fields]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- the corpus ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    requests: tuple[bytes, ...]  # complete raw requests, sent together (pipelined when several)
    reply: Any = echo  # what the origin answers (raw bytes or a RawOrigin handler)
    script: str = "send"  # "send", "expect" (wait for 100 before the body), "half-close", "upgrade",
    # "upgrade-early" (the new protocol's bytes and a half-close right behind the head)
    nginx: bool = True  # False: nginx is no oracle for the whole case (see the Difference named here)
    quirk: str = ""  # the Difference that makes nginx useless here
    answered: int = 0  # requests that are answered (and reach the origin); 0 = all of them
    bug: str = ""  # a known flagproxy bug: the case is a strict xfail with this reason

    @property
    def answers(self) -> int:
        return self.answered or len(self.requests)

    @property
    def prefix(self) -> str:
        return f"/{self.id}"

    @property
    def methods(self) -> list[bytes]:
        return [r.split(b" ", 1)[0] for r in self.requests]

    @property
    def version(self) -> bytes:
        return self.requests[-1].split(b"\r\n", 1)[0].rsplit(b"/", 1)[1]


def req(
    case_id: str,
    method: str = "GET",
    target: str = "/x",
    fields: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "test.example",
) -> bytes:
    """Exact request bytes for a case: ``target`` under the case's own prefix, only ``fields`` (plus
    Host unless None). Fields are given as text, encoded latin-1 (so \\xe9 is one obs-text byte)."""
    lines = [f"{method} /{case_id}{target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def case(case_id: str, *requests: dict[str, Any], **kwargs: Any) -> Case:
    return Case(case_id, tuple(req(case_id, **r) for r in requests or [{}]), **kwargs)


CHUNKED = (("Transfer-Encoding", "chunked"),)
CHUNKED_BODY = b"5;name=value\r\nhello\r\n1;x\r\n \r\n10\r\n0123456789abcdef\r\n3\r\n!!!\r\n0\r\n\r\n"
LONG_VALUE = "".join(chr(ord("a") + i % 26) for i in range(6 * 1024))
EARLY_HINTS = raw(
    b"HTTP/1.1 103 Early Hints", [("Link", "</style.css>; rel=preload; as=style")], length=False
)

CASES: list[Case] = [
    # methods
    case("get"),
    case("head", {"method": "HEAD"}),
    case("post-length", {"method": "POST", "fields": [("Content-Length", "11")], "body": b"hello world"}),
    case("put-length", {"method": "PUT", "fields": [("Content-Length", "4")], "body": b"data"}),
    case("patch-length", {"method": "PATCH", "fields": [("Content-Length", "2")], "body": b"{}"}),
    case("post-length-zero", {"method": "POST", "fields": [("Content-Length", "0")]}),
    case("post-no-body", {"method": "POST", "fields": [("Content-Type", "text/plain")]}),
    case("put-no-body", {"method": "PUT"}),
    case("delete-no-body", {"method": "DELETE"}),
    case("options", {"method": "OPTIONS", "fields": [("Access-Control-Request-Method", "PUT")]}),
    case("custom-method", {"method": "PURGE"}),
    # bodies
    case("chunked", {"method": "POST", "fields": [*CHUNKED, ("X-After", "1")], "body": CHUNKED_BODY}),
    case("chunked-empty", {"method": "POST", "fields": CHUNKED, "body": b"0\r\n\r\n"}),
    case("chunked-put", {"method": "PUT", "fields": CHUNKED, "body": b"3\r\nabc\r\n0\r\n\r\n"}),
    # header shapes
    case(
        "mixed-case-names",
        {
            "fields": [
                ("x-lower", "1"),
                ("X-UPPER", "2"),
                ("x-MiXeD-CaSe", "3"),
                ("hOsT", "test.example"),
                ("ACCEPT", "*/*"),
            ],
            "host": None,
        },
    ),
    case(
        "repeated-fields",
        {
            "fields": [
                ("X-Dup", "1"),
                ("Accept", "text/html"),
                ("X-Dup", "2"),
                ("x-dup", "3"),
                ("Accept", "*/*"),
            ]
        },
    ),
    case(
        "odd-legal-values",
        {
            "fields": [
                ("X-Odd", "a\"b'c(d)e{f}g|h~i`j!#$%&*+-.^_ \t tab, ; = / ? @ [ ] \\"),
                ("X-Empty", ""),
                ("X-Spaces", "inner   spaces"),
                ("Cookie", "a=1; b=2"),
            ]
        },
    ),
    case(
        "obs-text-values",
        {"fields": [("X-Latin1", "caf\xe9 \xff\x80"), ("X-Utf8", "café €".encode().decode("latin-1"))]},
    ),
    case("long-value-6k", {"fields": [("X-Long", LONG_VALUE), ("X-After", "kept")]}),
    case(
        "hop-by-hop",
        {
            "fields": [
                ("Connection", "keep-alive, X-Named"),
                ("X-Named", "named-by-connection"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "gzip"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Authorization", "Bearer end-to-end"),
                ("X-Kept", "yes"),
            ]
        },
    ),
    case("te-trailers", {"fields": [("TE", "trailers"), ("X-Kept", "yes")]}),
    case(
        "spoofed-flag-headers",
        {
            "fields": [
                ("X-Feature-Flags", '{"diff-on":false}'),
                ("x-feature-flags-config", "{}"),
                ("X-FEATURE-FLAGS-Anything", "1"),
                ("X-Kept", "yes"),
            ]
        },
    ),
    # request targets
    case("target-query", {"target": "/a?b=1&c"}),
    case("target-bare-query", {"target": "/a?"}),
    case("target-encoded", {"target": "/%7Euser/a%2Fb"}),
    case("target-double-slash", {"target": "/a//b"}),
    case("target-param", {"target": "/a;param"}),
    case("target-fragment", {"target": "/a#frag"}),
    # HTTP/1.0
    case("http10", {"version": "1.0"}),
    case("http10-keep-alive", {"version": "1.0", "fields": [("Connection", "keep-alive")]}),
    case(
        "http10-post",
        {"version": "1.0", "method": "POST", "fields": [("Content-Length", "3")], "body": b"abc"},
    ),
    case(
        "http10-chunked-reply",
        {"version": "1.0"},
        reply=raw(
            b"HTTP/1.1 200 OK", [("Transfer-Encoding", "chunked")], b"4\r\nabcd\r\n0\r\n\r\n", length=False
        ),
    ),
    case(
        "http10-keep-alive-chunked-reply",
        {"version": "1.0", "fields": [("Connection", "keep-alive")]},
        reply=raw(
            b"HTTP/1.1 200 OK", [("Transfer-Encoding", "chunked")], b"4\r\nabcd\r\n0\r\n\r\n", length=False
        ),
    ),
    # Expect, pipelining, half-close, upgrade
    case(
        "expect-100-continue",
        {"method": "PUT", "fields": [("Content-Length", "5"), ("Expect", "100-continue")], "body": b"hello"},
        script="expect",
    ),
    case(
        "pipelined-2",
        {"target": "/1"},
        {"method": "POST", "target": "/2", "fields": [("Content-Length", "3")], "body": b"two"},
    ),
    case(
        "pipelined-3",
        {"target": "/1"},
        {"method": "POST", "target": "/2", "fields": CHUNKED, "body": b"3\r\ntwo\r\n0\r\n\r\n"},
        {"method": "HEAD", "target": "/3"},
    ),
    case("pipelined-close", {"target": "/1"}, {"target": "/2", "fields": [("Connection", "close")]}),
    case(
        "pipelined-after-close",
        {"target": "/1", "fields": [("Connection", "close")]},
        {"target": "/2"},
        answered=1,  # RFC 9112 9.6: answered, then closed; what follows is not processed
    ),
    case(
        "http10-pipelined",
        {"version": "1.0"},
        {"target": "/2"},
        answered=1,
    ),
    case("half-close-get", script="half-close"),
    case(
        "half-close-post",
        {"method": "POST", "fields": [("Content-Length", "4")], "body": b"half"},
        script="half-close",
    ),
    case("upgrade-websocket", {"target": "/chat", "fields": WEBSOCKET}, reply=upgrade_echo, script="upgrade"),
    case(
        "upgrade-early-data-half-close",
        {"target": "/chat", "fields": WEBSOCKET},
        reply=upgrade_echo,
        script="upgrade-early",
        nginx=False,
        quirk="nginx-tunnel-half-close",
    ),  # a half-close that comes before the upstream connection is up must reach the origin too
    case(
        "upgrade-refused-then-pipelined",
        {"target": "/chat", "fields": WEBSOCKET},
        {"target": "/next", "fields": [("X-Feature-Flags", '{"admin":true}')]},
        reply=refuse_upgrades,
        answered=1,  # the smuggling check: the origin must never read the bytes after the head
        nginx=False,
        quirk="fp-refused-upgrade-closes",
    ),
    # origin response shapes
    case(
        "reply-length",
        reply=raw(b"HTTP/1.1 200 OK", [("Content-Type", "application/json"), ("X-A", "1")], b'{"a":1}'),
    ),
    case(
        "reply-chunked",
        reply=raw(
            b"HTTP/1.1 200 OK",
            [("X-A", "1"), ("Transfer-Encoding", "chunked"), ("X-B", "2")],
            b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
            length=False,
        ),
    ),
    case("reply-close-delimited", reply=close_delimited),
    case("reply-close-delimited-http10", {"version": "1.0"}, reply=close_delimited),
    case("reply-204", reply=raw(b"HTTP/1.1 204 No Content", [("X-A", "1")], length=False)),
    case(
        "reply-304",
        reply=raw(
            b"HTTP/1.1 304 Not Modified", [("ETag", '"v1"'), ("Cache-Control", "max-age=60")], length=False
        ),
    ),
    case(
        "reply-head-chunked",
        {"method": "HEAD"},
        reply=raw(b"HTTP/1.1 200 OK", [("Transfer-Encoding", "chunked")], length=False),
    ),
    case(
        "reply-103-early-hints",
        reply=EARLY_HINTS + raw(b"HTTP/1.1 200 OK", [("Content-Type", "text/plain")], b"after hints"),
        nginx=False,
        quirk="nginx-1xx",
    ),
    case("reply-custom-reason", reply=raw(b"HTTP/1.1 200 Fine Thanks", [("X-A", "1")], b"fine")),
    case("reply-status-418", reply=raw(b"HTTP/1.1 418 I'm a teapot", [], b"short and stout")),
    case(
        "reply-mixed-case-names",
        reply=raw(
            b"HTTP/1.1 200 OK",
            [
                ("x-lower", "1"),
                ("X-UPPER", "2"),
                ("content-TYPE", "text/x"),
                ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("Server", "origin/1"),
                ("x-MiXeD", "3"),
            ],
            b"mixed",
        ),
    ),
    case(
        "reply-repeated-fields",
        {"fields": [("X-User-Id", "u1")]},
        reply=raw(
            b"HTTP/1.1 200 OK",
            [("Set-Cookie", "a=1; Path=/"), ("X-R", "1"), ("Set-Cookie", "b=2"), ("X-R", "2")],
            b"r",
        ),
    ),
    case(
        "reply-hop-by-hop",
        reply=raw(
            b"HTTP/1.1 200 OK",
            [
                ("Connection", "X-Bar"),
                ("X-Bar", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", 'Basic realm="origin"'),
                ("Proxy-Connection", "keep-alive"),
                ("Trailer", "X-Checksum"),
                ("X-Kept", "yes"),
            ],
            b"hop",
        ),
    ),
    case("reply-obs-text", reply=raw(b"HTTP/1.1 200 OK", [("X-R", "caf\xe9 \xff")], b"obs")),
]


# --- nginx ---------------------------------------------------------------------------------------------

NGINX_CONF = """\
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    upstream origin {{
        server {origin};
        keepalive 16;
    }}
    server {{
        listen {listen};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_pass_request_headers on;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_ignore_client_abort on;  # else a half-closed client is cut off (499) before its answer
        location / {{
            proxy_pass http://origin;
        }}
        location /upgrade- {{  # nginx forwards no Upgrade without these lines
            proxy_pass http://origin;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Nginx:
    """A private nginx (foreground, no master process) with its own prefix, config and logs."""

    def __init__(self, binary: str, directory: Path, origin_port: int) -> None:
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.origin_port = origin_port
        self.error_log = directory / "error.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        conf = self.dir / "nginx.conf"
        listen, origin = f"{LOCALHOST}:{self.port}", f"{LOCALHOST}:{self.origin_port}"
        conf.write_text(NGINX_CONF.format(dir=self.dir, listen=listen, origin=origin))
        cmd = [self.binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(conf)]
        cmd += ["-g", "daemon off; master_process off;"]
        with open(self.dir / "nginx.stderr", "wb") as stderr:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        process = self.process
        wait_for(lambda: process.poll() is not None or accepting(self.port), timeout=10, what="nginx")
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        text = ""
        for path in (self.dir / "nginx.stderr", self.error_log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text[-4000:]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def nginx_binary() -> str:
    """nginx, installed by scripts/ensure-nginx.sh when missing (root + apt-get); else a skip."""
    binary = find_nginx()
    if binary is None:
        script = REPO / "scripts" / "ensure-nginx.sh"
        result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=300, check=False)
        binary = find_nginx()
        if binary is None:
            pytest.skip(f"nginx is not installed and could not be installed: {result.stderr.strip()[-500:]}")
    return binary


# --- the three legs -----------------------------------------------------------------------------------


@dataclass
class Leg:
    name: str
    port: int
    origin: RawOrigin


SENTINEL_PREFIX = "/sentinel"


def configure(origin: RawOrigin) -> RawOrigin:
    for c in CASES:
        origin.route(c.prefix + "/", c.reply)
    origin.route(SENTINEL_PREFIX + "/", echo)
    return origin


@pytest.fixture(scope="module")
def fp_origin(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    origin = configure(origin_factory())
    origin.route(PROPERTY_PREFIX + "/", property_reply)  # test_flagproxy_never_desyncs
    return origin


@pytest.fixture(scope="module")
def flagproxy(proxy_factory: Callable[..., ProxyProcess], fp_origin: RawOrigin) -> ProxyProcess:
    return proxy_factory([fp_origin.url], flags=FLAGS)


@pytest.fixture(scope="module")
def nginx(
    origin_factory: Callable[..., RawOrigin], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Nginx, RawOrigin]]:
    binary = nginx_binary()
    origin = configure(origin_factory())
    server = Nginx(binary, tmp_path_factory.mktemp("nginx"), origin.port).start()
    yield server, origin
    server.stop()


@pytest.fixture(scope="module")
def legs(
    origin_factory: Callable[..., RawOrigin],
    nginx: tuple[Nginx, RawOrigin],
    flagproxy: ProxyProcess,
    fp_origin: RawOrigin,
) -> dict[str, Leg]:
    direct = configure(origin_factory())
    return {
        DIRECT: Leg(DIRECT, direct.port, direct),
        NGINX: Leg(NGINX, nginx[0].port, nginx[1]),
        FLAGPROXY: Leg(FLAGPROXY, flagproxy.port, fp_origin),
    }


# --- playing a case ------------------------------------------------------------------------------------


@dataclass
class Observed:
    upstream: list[Message] = field(default_factory=list)  # what the origin received, in order
    responses: list[Message] = field(default_factory=list)  # what the client read, in order
    continue_: Message | None = None  # the interim answer to Expect: 100-continue
    tunnel: bytes = b""  # bytes that came back through an upgraded connection
    after: bytes = b""  # bytes after the last response until the server closed
    sentinel: bytes | None = None  # body of a request sent after the case on the same connection
    error: str = ""  # the connection ended before every expected response came


def sentinel_request(case_id: str) -> bytes:
    return f"GET {SENTINEL_PREFIX}/{case_id} HTTP/1.1\r\nHost: test.example\r\nX-User-Id: s\r\n\r\n".encode()


NO_CLOSE = b"<the server did not close the connection>"
CLOSE_WAIT_S = 2.0


def rest_until_close(sock: socket.socket, reader: Reader) -> bytes:
    """What comes until the server closes (NO_CLOSE appended when it does not within CLOSE_WAIT_S)."""
    sock.settimeout(CLOSE_WAIT_S)
    try:
        return reader.rest()
    except TimeoutError:
        data, reader.buffer = reader.buffer, b""
        return data + NO_CLOSE


def play(c: Case, leg: Leg) -> Observed:
    observed = Observed()
    wire = b"".join(c.requests)
    with socket.create_connection((LOCALHOST, leg.port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = Reader(sock)
        closed = False
        if c.script == "expect":
            head, sep, body = wire.partition(b"\r\n\r\n")
            sock.sendall(head + sep)
            observed.continue_ = reader.response(c.methods[0], stop_at_interim=True)
            sock.sendall(body)
            observed.responses.append(reader.response(c.methods[0]))
        elif c.script in ("upgrade", "upgrade-early"):
            early = c.script == "upgrade-early"
            if early:  # head, first bytes and FIN in one segment: the EOF comes right behind the head
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                sock.sendall(wire + UPGRADE_PAYLOAD)
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.sendall(wire)
            response = reader.response(c.methods[0])
            observed.responses.append(response)
            if response.status == 101:
                if not early:
                    sock.sendall(UPGRADE_PAYLOAD)
                observed.tunnel = reader.exactly(len(UPGRADE_PAYLOAD))
                if not early:
                    sock.shutdown(socket.SHUT_WR)
                observed.after, closed = rest_until_close(sock, reader), True
        else:
            sock.sendall(wire)
            if c.script == "half-close":
                sock.shutdown(socket.SHUT_WR)
            for method in c.methods[: c.answers]:
                try:
                    observed.responses.append(reader.response(method))
                except ConnectionError as exc:  # recorded: the comparison says what is missing
                    observed.error = str(exc)
                    break
        last = observed.responses[-1] if observed.responses else None
        if last is None or closed or last.framing == "close" or leg.name == DIRECT:
            pass  # (the raw origin knows nothing of HTTP/1.0 persistence: direct is only the input)
        elif c.script == "half-close" or not last.persistent(c.version):
            observed.after = rest_until_close(sock, reader)  # the server must close, with nothing more
        else:  # kept alive: one more request must be answered as itself (no desync)
            sock.sendall(sentinel_request(c.id))
            observed.sentinel = reader.response(b"GET").body
    prefix = f"{c.prefix}/".encode()
    with leg.origin.changed:
        recorded = [r for r in leg.origin.requests if r.target.startswith(prefix)]
    observed.upstream = [from_recorded(r) for r in recorded]
    if leg.name == DIRECT:  # the raw origin answers whatever follows, HTTP/1.0 and close or not
        observed.upstream = observed.upstream[: c.answers]
    return observed


# --- views ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    side: str
    input: Message  # the same message as direct saw it: what the client sent / what the origin answered
    version: bytes  # the client's HTTP version

    @property
    def host(self) -> str:
        hosts = [v for n, v in self.input.fields if lname(n) == "host"]
        return hosts[0].decode("latin-1") if hosts else ""


def end_to_end(fields: Sequence[Field]) -> list[Field]:
    """RFC 9110 7.6.1 on the input: what an ideal relay passes on (Upgrade only for an upgrade)."""
    named = connection_named(fields)
    keep = {"upgrade"} if "upgrade" in named else set()
    return [
        (n, v)
        for n, v in fields
        if lname(n) in keep or (lname(n) not in HOP_BY_HOP and lname(n) not in named)
    ]


def fields_of(message: Message, proxy: str, ctx: Context) -> list[Field]:
    """``message``'s fields minus what the table says only ``proxy`` sends."""
    if proxy == DIRECT:
        return end_to_end(message.fields)
    extras = rows(proxy, ctx.side, EXTRA)
    return [(n, v) for n, v in message.fields if not any(d.matches(n, v, ctx) for d in extras)]


def comparable(message: Message, proxy: str, ctx: Context) -> dict[str, Any]:
    """What must be equal through nginx and flagproxy (or flagproxy and direct)."""
    left_out = no_oracle_names(ctx.side) | FRAMING
    view: dict[str, Any] = {
        "start line": message.start,
        "fields": [(n, v) for n, v in fields_of(message, proxy, ctx) if lname(n) not in left_out],
        "body": message.body,
    }
    if "framing" not in no_oracle_aspects(ctx.side):
        view["framing"] = message.framing
    if ctx.side == CLIENT:
        view["interim"] = [(i.start, fields_of(i, proxy, ctx)) for i in message.interim]
        if message.status != 101:
            view["persistent"] = message.persistent(ctx.version)
    return view


def oracle_view(message: Message, proxy: str, ctx: Context) -> dict[str, Any]:
    """The aspects nginx is no reference for: flagproxy's must equal direct's."""
    names = no_oracle_names(ctx.side)
    view: dict[str, Any] = {
        "fields": [(n, v) for n, v in fields_of(message, proxy, ctx) if lname(n) in names]
    }
    if "framing" in no_oracle_aspects(ctx.side):
        view["framing"] = message.framing
    return view


def is_subsequence(part: Sequence[Field], whole: Sequence[Field]) -> bool:
    it = iter(whole)
    return all(any(f == g for g in it) for f in part)


def show(message: Message) -> bytes:
    lines = [message.start] + [n + b": " + v for n, v in message.fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + message.body[:300]


def assert_flagproxy_relays_only_input(message: Message, ctx: Context, where: str) -> None:
    """flagproxy's promise: except its documented additions (and its own chunked framing), every field
    is one of the input's, byte for byte, in the input's order."""
    relayed = [
        (n, v)
        for n, v in fields_of(message, FLAGPROXY, ctx)
        if not (lname(n) == "transfer-encoding" and v.lower() == b"chunked")
    ]
    assert is_subsequence(relayed, ctx.input.fields), (
        f"{where}: flagproxy sent fields that are not the input's, in the input's order\n"
        f"  flagproxy: {show(message)!r}\n  input:     {show(ctx.input)!r}"
    )


# --- the differential test ------------------------------------------------------------------------------


SIDES = ((ORIGIN, "upstream", "what the origin received"), (CLIENT, "responses", "what the client received"))


def compare(c: Case, observed: dict[str, Observed]) -> None:
    """nginx (or direct, for the cases nginx is no oracle for) against flagproxy, side by side."""
    reference = NGINX if c.nginx else DIRECT
    ref, fp, direct = observed[reference], observed[FLAGPROXY], observed[DIRECT]
    closes = bool(c.quirk) and DIFFERENCE[c.quirk].effect == CLOSES
    for name, seen in observed.items():
        got = (
            f"\n  the client got {[show(m) for m in seen.responses]} {seen.error}"
            f"\n  the origin got {[show(m) for m in seen.upstream]}"
        )
        assert len(seen.responses) == c.answers, f"{name}: {len(seen.responses)} of {c.answers} answers{got}"
        assert len(seen.upstream) == c.answers, f"{name}: the origin got {len(seen.upstream)} requests{got}"

    for side, attr, what in SIDES:
        for i in range(c.answers):
            given_, got_ref, got_fp = (getattr(seen, attr)[i] for seen in (direct, ref, fp))
            ctx = Context(side, given_, c.version)
            where = f"{c.id}: {what} #{i + 1}"
            mine, theirs = comparable(got_fp, FLAGPROXY, ctx), comparable(got_ref, reference, ctx)
            if closes and side == CLIENT:
                assert mine.pop("persistent") is False, f"{where}: flagproxy keeps the connection"
                theirs.pop("persistent")
            assert mine == theirs, f"{where}\n  {reference}: {show(got_ref)!r}\n  flagproxy: {show(got_fp)!r}"
            assert oracle_view(got_fp, FLAGPROXY, ctx) == oracle_view(given_, DIRECT, ctx), (
                f"{where} (against direct)\n  direct:    {show(given_)!r}\n  flagproxy: {show(got_fp)!r}"
            )
            assert_flagproxy_relays_only_input(got_fp, ctx, where)
            for interim, interim_input in zip(got_fp.interim, given_.interim, strict=False):
                assert_flagproxy_relays_only_input(interim, Context(side, interim_input, c.version), where)
            if side == CLIENT and c.version == b"1.0":
                assert got_fp.framing != "chunked", f"{where}: chunked to an HTTP/1.0 client"

    if c.script == "expect":
        assert fp.continue_ is not None and ref.continue_ is not None
        assert fp.continue_.start == ref.continue_.start == b"HTTP/1.1 100 Continue"
        assert fp.continue_.fields == ref.continue_.fields
    assert fp.tunnel == ref.tunnel == direct.tunnel, "bytes through the upgraded connection"
    if c.script.startswith("upgrade"):
        assert fp.tunnel == UPGRADE_PAYLOAD.upper()
    assert fp.after == ref.after == b"", f"after the last response: {fp.after[:200]!r} / {ref.after[:200]!r}"
    expected_sentinel = b"GET %s/%s 0" % (SENTINEL_PREFIX.encode(), c.id.encode())
    for name, seen in ((reference, ref), (FLAGPROXY, fp)):
        assert seen.sentinel in (None, expected_sentinel), f"{name}: the next request got {seen.sentinel!r}"
    if reference != DIRECT:
        assert (fp.sentinel is None) == (ref.sentinel is None), "one kept the connection, the other closed it"


def case_params() -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
        for c in CASES
    ]


@pytest.mark.parametrize("c", case_params())
def test_nginx_and_flagproxy_deliver_the_same(c: Case, legs: dict[str, Leg]) -> None:
    if not c.nginx:
        assert DIFFERENCE[c.quirk].effect in (NO_ORACLE, CLOSES)  # the table says why nginx is not played
    observed = {name: play(c, leg) for name, leg in legs.items() if c.nginx or name != NGINX}
    compare(c, observed)


def test_the_difference_table_is_consistent() -> None:
    """The table in the docstring and the one in code are the same; every row is well formed."""
    keys = [d.key for d in DIFFERENCES]
    assert len(keys) == len(set(keys))
    documented = re.findall(r"^([a-z0-9-]+) +(?:fp|nginx) +(?:origin|client) ", __doc__ or "", re.M)
    assert documented == keys, "the docstring's table and DIFFERENCES list different rows"
    for d in DIFFERENCES:
        assert d.proxy in (FLAGPROXY, NGINX) and d.side in (ORIGIN, CLIENT)
        assert d.effect in (EXTRA, NO_ORACLE, CLOSES), d.key
        assert d.verdict, d.key
        assert d.fields or (d.effect in (NO_ORACLE, CLOSES) and d.aspect != "fields"), d.key
        if d.effect == NO_ORACLE:
            assert d.proxy == NGINX and all(v == ANY for _, v in d.fields), d.key
        if d.effect == CLOSES:
            assert d.proxy == FLAGPROXY and d.aspect == "persistent" and not d.fields, d.key
        for name, pattern in d.fields:
            assert name == NAMED_BY_CONNECTION or name == name.lower(), d.key
            re.compile(pattern)
    assert {c.quirk for c in CASES if not c.nginx} <= set(keys)
    assert all(c.quirk for c in CASES if not c.nginx)
    assert len({c.id for c in CASES}) == len(CASES)


# --- property: flagproxy never desynchronises -----------------------------------------------------------

PROPERTY_PREFIX = "/prop"
_examples = itertools.count(1)
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F))


async def property_reply(request: RecordedRequest, conn: OriginConnection) -> None:
    """Describes the request it got; framed as its X-Reply field asks."""
    shape = dict((lname(n), v) for n, v in request.headers).get("x-reply", b"length").decode()
    body = json.dumps(
        {
            "target": request.target.decode("latin-1"),
            "length": request.body_length,
            "sha256": request.body_sha256,
        }
    ).encode()
    if shape == "204":
        await conn.send(b"HTTP/1.1 204 No Content\r\nX-Shape: 204\r\n\r\n")
        return
    if shape == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        cut = len(body) // 3
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p) + b"0\r\n\r\n"
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        framed = body
    await conn.send(head if request.method == "HEAD" else head + framed)


@dataclass
class Generated:
    method: str
    target: str
    fields: list[tuple[str, str]]
    framing: str  # "none", "length", "chunked"
    body: bytes
    wire: bytes
    reply: str


@st.composite
def generated_request(draw: st.DrawFn, target: str) -> Generated:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "REPORT"]))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=700))
    names = st.text(NAME_CHARS, min_size=1, max_size=12).map(lambda s: "X-P-" + s)
    values = st.text(VALUE_CHARS, max_size=40).map(str.strip)
    fields = draw(st.lists(st.tuples(names, values), max_size=5))
    reply = draw(st.sampled_from(["length", "chunked", "204"]))
    head = [f"{method} {target} HTTP/1.1", "Host: prop.example", f"X-Reply: {reply}"]
    head += [f"{n}: {v}" for n, v in fields]
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        cuts = (
            sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=6))) if len(body) > 1 else []
        )
        pieces = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)]) if body[a:b]]
        extension = draw(st.sampled_from(["", ";x", ";name=value", ';q="quoted"']))
        payload = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension.encode(), p) for p in pieces) + b"0\r\n\r\n"
    else:
        payload = b""
    wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
    return Generated(method, target, fields, framing, body, wire, reply)


PLACEHOLDER = "000000"  # the example's number, filled in at run time (same width: split points stay valid)


@st.composite
def generated_exchange(draw: st.DrawFn) -> tuple[list[Generated], list[int]]:
    count = draw(st.integers(1, 3))
    requests = [draw(generated_request(f"{PROPERTY_PREFIX}/{PLACEHOLDER}/{i}?q={i}")) for i in range(count)]
    total = sum(len(r.wire) for r in requests)
    splits = sorted(draw(st.sets(st.integers(1, total - 1), max_size=6)))
    return requests, splits


def numbered(r: Generated, number: str) -> Generated:
    return Generated(
        r.method,
        r.target.replace(PLACEHOLDER, number, 1),
        r.fields,
        r.framing,
        r.body,
        r.wire.replace(PLACEHOLDER.encode(), number.encode(), 1),
        r.reply,
    )


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(exchange=generated_exchange())
def test_flagproxy_never_desyncs(flagproxy: ProxyProcess, fp_origin: RawOrigin, exchange: Any) -> None:
    """Random valid framings, 1-3 pipelined requests, random send splits: every request reaches the
    origin once with exactly its body and fields, and every answer comes back once, in order."""
    generated, splits = exchange
    number = f"{next(_examples):06d}"  # a fresh prefix even when hypothesis replays an example
    example = f"{PROPERTY_PREFIX}/{number}"
    requests = [numbered(r, number) for r in generated]
    wire = b"".join(r.wire for r in requests)
    with socket.create_connection((LOCALHOST, flagproxy.port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in itertools.pairwise([0, *splits, len(wire)]):
            sock.sendall(wire[a:b])
        reader = Reader(sock)
        responses = [reader.response(r.method.encode()) for r in requests]
        sock.sendall(b"GET /prop-end HTTP/1.1\r\nHost: prop.example\r\nConnection: close\r\n\r\n")
        end = reader.response(b"GET")
        trailing = reader.rest()
    assert end.status == 200 and trailing == b"", (end.start, trailing[:200])

    with fp_origin.changed:
        seen = [r for r in fp_origin.requests if r.target.startswith(f"{example}/".encode())]
    assert [r.target.decode() for r in seen] == [r.target for r in requests], (
        "each request exactly once, in order"
    )
    for sent, got in zip(requests, seen, strict=True):
        assert got.complete and got.body == sent.body, (sent.wire[:300], got.head)
        assert got.method == sent.method
        assert got.chunked == (sent.framing == "chunked")
        lengths = got.values("Content-Length")
        assert lengths == ([str(len(sent.body))] if sent.framing == "length" else []), got.head
        relayed = [
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in got.headers if n.startswith(b"X-P-")
        ]
        assert relayed == sent.fields, got.head

    for sent, response in zip(requests, responses, strict=True):
        if sent.reply == "204":
            assert response.status == 204 and response.body == b""
        elif sent.method == "HEAD":
            assert response.status == 200 and response.body == b""
        else:
            assert response.status == 200, response.start
            described = json.loads(response.body)
            assert described == {
                "target": sent.target,
                "length": len(sent.body),
                "sha256": hashlib.sha256(sent.body).hexdigest(),
            }
