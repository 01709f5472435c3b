"""Data plane: forward one request to its origin, streaming both ways, flags added on the way.

Read top to bottom: route → resolve flags → rewrite request headers → send upstream →
rewrite response headers → stream the body back. Header rules are data (the sets below).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from proxy.budget_watch import BudgetWatch
from proxy.config import OriginSettings, Settings, header_budget
from proxy.metrics import NO_ROUTE, Metrics, OriginMetrics
from proxy.origin import sign
from proxy.resolver import Resolver

log = logging.getLogger("flagproxy.forward")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # anything else is replaced, never logged as sent

# RFC 9110 §7.6.1: meaningful for one connection only; never forwarded in either direction.
# Every header named by a Connection header is dropped too.
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
# What aiohttp would otherwise add on its own: the origin sees only what the client sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class BadRequest(Exception):
    """The request cannot be forwarded as it is; the message goes into the 400 body."""


class ClientGone(Exception):
    """The downstream client disconnected while we were reading its request body."""


@dataclass
class Origin:
    """One upstream, matched by raw path prefix (on segment boundaries)."""

    prefix: bytes  # normalised: no trailing slash, b"" for the root
    base: str  # scheme://host[:port]
    base_path: str  # path on the origin to prepend, no trailing slash
    netloc: bytes
    strip_prefix: bool
    rewrite_host: bool
    timeout: aiohttp.ClientTimeout
    pool_limit: int
    keepalive_timeout_s: float
    budget: int  # bytes of request line + headers the origin may receive
    alert_at: int  # alert when a request uses this many
    session: aiohttp.ClientSession | None = None
    metrics: OriginMetrics | None = None
    label: str = field(init=False)  # the origin as metrics and logs name it: its route prefix

    def __post_init__(self) -> None:
        self.label = self.prefix.decode("latin-1") or "/"

    @classmethod
    def from_settings(cls, origin: OriginSettings, settings: Settings) -> Origin:
        parts = urlsplit(origin.url)
        up = settings.upstream
        connect = origin.connect_timeout_s or up.connect_timeout_s
        return cls(
            prefix=origin.prefix.rstrip("/").encode("latin-1"),
            base=f"{parts.scheme}://{parts.netloc}",
            base_path=parts.path.rstrip("/"),
            netloc=parts.netloc.encode("latin-1"),
            strip_prefix=origin.strip_prefix,
            rewrite_host=settings.proxy.rewrite_host if origin.rewrite_host is None else origin.rewrite_host,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=up.pool_timeout_s + connect,
                sock_connect=connect,
                sock_read=origin.read_timeout_s or up.read_timeout_s,
            ),
            pool_limit=origin.pool_limit or up.pool_limit,
            keepalive_timeout_s=up.keepalive_timeout_s,
            budget=(budget := header_budget(settings, origin)),
            alert_at=math.ceil(budget * settings.header.alert_ratio),
        )

    def matches(self, raw_path: bytes) -> bool:
        p = self.prefix
        return not p or raw_path == p or (raw_path.startswith(p) and raw_path[len(p) : len(p) + 1] == b"/")

    def target(self, raw_path: bytes, query: bytes) -> str:
        """The request target sent upstream, byte for byte: base path + (stripped) raw path + query."""
        path = raw_path[len(self.prefix) :] if self.strip_prefix else raw_path
        if not path.startswith(b"/"):
            path = b"/" + path
        target = self.base_path + path.decode("latin-1")
        if query:
            target += "?" + query.decode("latin-1")
        return target

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.pool_limit,
            limit_per_host=0,
            keepalive_timeout=self.keepalive_timeout_s,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Router:
    """Longest prefix wins."""

    def __init__(self, origins: list[Origin]) -> None:
        self.origins = sorted(origins, key=lambda o: len(o.prefix), reverse=True)

    def match(self, raw_path: bytes) -> Origin | None:
        for origin in self.origins:
            if origin.matches(raw_path):
                return origin
        return None


class RequestBody:
    """The client's request body as an async iterator, streamed to the origin chunk by chunk."""

    __slots__ = ("complete", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.complete = True
                return


SIGNATURE_NAME = "X-Feature-Flags-Signature"

# Header lines aiohttp adds on its own (see aiohttp ClientRequest.update_body_from_data).
CHUNKED_LINE = len("Transfer-Encoding: chunked\r\n")
EMPTY_LENGTH_LINE = len("Content-Length: 0\r\n")
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


def wire_size(headers: list[tuple[str, str]]) -> int:
    """Bytes of ``name: value\r\n`` lines as aiohttp writes them (values in UTF-8)."""
    total = 0
    for name, value in headers:
        total += len(name) + 4 + (len(value) if value.isascii() else len(value.encode("utf-8")))
    return total


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() != b"0"
    return False


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def field_text(value: bytes) -> str:
    """aiohttp writes header fields as UTF-8, so decode them as UTF-8: the origin gets the client's bytes.

    Bytes that are not UTF-8 (obs-text) could not reach the origin unchanged, so such a request is
    refused (400) rather than forwarded altered.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a header value is not valid UTF-8") from None


def new_request_id() -> str:
    return os.urandom(8).hex()


def request_id_for(scope: Scope) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is sane, else a new one (kept in scope)."""
    found: str | None = scope.get("flagproxy.request_id")
    if found is None:
        for name, value in scope["headers"]:
            if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
                found = value.decode("ascii")
                break
        scope["flagproxy.request_id"] = found = found or new_request_id()
    return found


def error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def send_json_error(send: Send, status: int, error: str, detail: str, request_id: str = "") -> None:
    body = error_body(error, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """While a request waits for its origin: after ``after_s`` (fast answers cost one timer), and once
    its body (if any) is all read, watch for the client leaving and cancel the wait when it does (499).
    Until the body is complete the body reader is the one calling ``receive`` and notices instead."""

    after_s = 0.05
    __slots__ = ("_body", "_handle", "_receive", "_scope", "_task", "_waiting", "_watcher")

    def __init__(self, scope: Scope, receive: Receive, body: RequestBody | None) -> None:
        self._scope = scope
        self._receive = receive
        self._body = body
        self._task = asyncio.current_task()
        self._waiting = True
        self._watcher: asyncio.Future[None] | None = None
        self._handle = asyncio.get_running_loop().call_later(self.after_s, self._start)

    def _start(self) -> None:
        if not self._waiting:
            return
        if self._body is not None and not self._body.complete:
            self._handle = asyncio.get_running_loop().call_later(self.after_s, self._start)
        else:
            self._watcher = asyncio.ensure_future(wait_for_disconnect(self._receive))
            self._watcher.add_done_callback(self._gone)

    def _gone(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        if self._waiting and self._task is not None:
            self._scope["flagproxy.client_gone"] = True
            self._task.cancel()

    def stop(self) -> None:
        self._waiting = False
        self._handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class Forwarder:
    """The raw ASGI handler for proxied traffic (no framework objects on this path)."""

    def __init__(
        self, settings: Settings, resolver: Resolver, budget: BudgetWatch, metrics: Metrics | None = None
    ) -> None:
        self.router = Router([Origin.from_settings(o, settings) for o in settings.origins])
        self.metrics = metrics or Metrics()
        for origin in self.router.origins:
            origin.metrics = self.metrics.for_origin(origin.label)
        self.budget = budget
        self.signature_secret = settings.header.signature_secret
        self.resolver = resolver
        self.flag_headers = resolver.headers
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in settings.proxy.trusted_proxies]
        self.via_name = settings.proxy.via

    async def start(self) -> None:
        for origin in self.router.origins:
            await origin.open()

    async def close(self) -> None:
        for origin in self.router.origins:
            await origin.close()

    def is_trusted(self, client: tuple[str, int] | None) -> bool:
        if not self.trusted or not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def request_headers(self, scope: Scope, origin: Origin) -> list[tuple[str, str]]:
        """Incoming headers minus hop-by-hop and spoofed flags, plus forwarding info (flags come later)."""
        incoming: list[tuple[bytes, bytes]] = scope["headers"]
        drop = HOP_BY_HOP
        if any(n == b"connection" for n, _ in incoming):
            drop = HOP_BY_HOP | connection_tokens(incoming)
        trusted = self.is_trusted(scope.get("client"))
        reserved = self.flag_headers.is_reserved

        out: list[tuple[str, str]] = []
        host = xff = xfp = xfh = via = None
        request_id: str | None = None
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
            elif name == b"x-request-id":
                if request_id is None and REQUEST_ID.fullmatch(value):
                    request_id = value.decode("ascii")
            else:
                out.append((name.decode("latin-1"), field_text(value)))

        if host is None and scope.get("http_version") == "1.1":
            raise BadRequest("an HTTP/1.1 request needs a Host header")  # RFC 9112 §3.2
        outgoing_host = origin.netloc if origin.rewrite_host or host is None else host
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
        scope["flagproxy.request_id"] = request_id = request_id or new_request_id()
        out.append(("X-Request-Id", request_id))
        return out

    @staticmethod
    def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        origin = self.router.match(raw_path)
        if origin is None or origin.session is None:
            self.metrics.no_route.inc()
            scope["flagproxy.origin"] = NO_ROUTE
            detail = "no origin is configured for this path"
            await send_json_error(send, 404, "no_route", detail, request_id_for(scope))
            return
        scope["flagproxy.origin"] = origin.label
        try:
            status = await self.forward(scope, receive, send, origin, raw_path)
        except asyncio.CancelledError:
            if scope.get("flagproxy.client_gone"):
                status = 499  # DisconnectWatch stopped the wait: nobody to answer
            else:
                status = await self.cut_short(scope, send)
        origin.metrics.request(status)  # type: ignore[union-attr]  # bound in __init__

    @staticmethod
    async def cut_short(scope: Scope, send: Send) -> int:
        """uvicorn cancels what still runs when the shutdown grace period ends: say so in JSON (503)
        when the response has not started, else end here (the client sees a cut body)."""
        request_id = scope.get("flagproxy.request_id", "")
        log.warning("shutdown grace period over: request cut short", extra={"request_id": request_id})
        started: int = scope.get("flagproxy.started", 0)
        if started:
            return started
        detail = "the proxy is shutting down and the origin did not answer within the grace period"
        await send_json_error(send, 503, "shutting_down", detail, request_id)
        return 503

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, origin: Origin, raw_path: bytes
    ) -> int:
        """Forward one request; the status the client got (499 when it left before a response)."""
        metrics: OriginMetrics = origin.metrics  # type: ignore[assignment]
        resolution = self.resolver.resolve(scope)
        try:
            headers = self.request_headers(scope, origin)
        except BadRequest as exc:
            await send_json_error(send, 400, "bad_request", str(exc), request_id_for(scope))
            return 400
        body = RequestBody(receive) if has_body(scope["headers"]) else None
        target = origin.target(raw_path, scope.get("query_string", b""))
        method = scope["method"]

        # The head exactly as aiohttp writes it: request line, headers, what it adds, blank line.
        head = len(method) + len(target) + 12 + wire_size(headers) + 2
        if not any(name == "content-length" for name, _ in headers):
            if body is not None:
                head += CHUNKED_LINE  # aiohttp frames a streamed body without a length as chunked
            elif method not in BODYLESS_METHODS:
                head += EMPTY_LENGTH_LINE  # and declares an empty body on POST/PUT/PATCH/DELETE
        signing_at = int(time.time()) if self.signature_secret else 0
        if signing_at:  # room for X-Feature-Flags-Signature: t=…,m=…,v1=<64 hex>,p=<target>
            head += len(SIGNATURE_NAME) + 4 + len(f"t={signing_at},m={method},v1=,p={target}") + 64
        fitted = self.flag_headers.fit(resolution.resolved, origin.budget - head)
        for name, value in fitted.headers:
            headers.append((name.decode("latin-1"), value.decode("ascii")))
        flag_bytes = fitted.size
        if signing_at:
            values = {name: value.decode("ascii") for name, value in fitted.headers}
            signature = sign(
                self.signature_secret,
                signing_at,
                method,
                target,
                values.get(self.flag_headers.name, ""),
                values.get(self.flag_headers.config_name, ""),
                values.get(self.flag_headers.omitted_name, ""),
            )
            headers.append((SIGNATURE_NAME, signature))
            flag_bytes += len(SIGNATURE_NAME) + 4 + len(signature)
        metrics.header_bytes.observe(flag_bytes)
        used = head + fitted.size
        if fitted.omitted or used >= origin.alert_at:
            self.budget.exceeded(scope, origin, resolution.resolved, fitted, used)
        url = URL(origin.base + target, encoded=True)
        request_id = scope["flagproxy.request_id"]

        started = time.perf_counter()
        # A slow origin: notice a client that leaves meanwhile and stop waiting for the origin.
        watch = DisconnectWatch(scope, receive, body)
        try:
            response = await origin.session.request(  # type: ignore[union-attr]  # open while routed
                method,
                url,
                headers=headers,
                data=body.__aiter__() if body is not None else None,
                allow_redirects=False,
                compress=False,
            )
        except ClientGone:
            return 499
        except TimeoutError:
            metrics.upstream_error("timeout")
            await send_json_error(
                send, 504, "gateway_timeout", "the origin did not answer in time", request_id
            )
            return 504
        except aiohttp.ClientConnectorError as exc:
            metrics.upstream_error("connect")
            reason = exc.os_error.strerror or exc
            await send_json_error(send, 502, "bad_gateway", f"origin unreachable: {reason}", request_id)
            return 502
        except (aiohttp.ClientError, OSError) as exc:
            if body is not None and isinstance(exc.__cause__, ClientGone):
                return 499
            metrics.upstream_error("other")
            log.warning(
                "upstream request failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"request_id": request_id, "origin": origin.label},
            )
            detail = f"origin request failed: {type(exc).__name__}"
            await send_json_error(send, 502, "bad_gateway", detail, request_id)
            return 502
        finally:
            watch.stop()
        metrics.latency.observe(time.perf_counter() - started)

        try:
            await self.stream_response(scope, receive, send, response, body, resolution.response_headers)
        finally:
            response.release()
        return response.status

    async def stream_response(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        response: aiohttp.ClientResponse,
        body: RequestBody | None,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        headers = self.response_headers(response.raw_headers)
        if extra_headers:
            headers.extend(extra_headers)
        headers.append((b"x-request-id", scope["flagproxy.request_id"].encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        scope["flagproxy.started"] = response.status

        content = response.content
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "origin response broke before its body: %s",
                type(exc).__name__,
                extra={"request_id": scope["flagproxy.request_id"]},
            )
            return
        if content.at_eof():
            await send({"type": "http.response.body", "body": chunk})
            return

        # A longer body: watch for the client going away so the upstream connection is freed at once.
        watcher = None
        if body is None or body.complete:
            watcher = asyncio.ensure_future(wait_for_disconnect(receive))
            watcher.add_done_callback(lambda task: task.cancelled() or response.close())
        try:
            while chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is not None and watcher.done():
                    return
                chunk = await content.readany()
            await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if watcher is None or not watcher.done():
                # Headers are out: the only honest signal left is an incomplete response.
                log.warning(
                    "origin response broke mid-body: %s",
                    type(exc).__name__,
                    extra={"request_id": scope["flagproxy.request_id"]},
                )
        finally:
            if watcher is not None:
                watcher.cancel()
