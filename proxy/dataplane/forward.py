"""Data plane: one proxied exchange, from the client's request head to the end of the response.

Read top to bottom: route → resolve flags → rewrite the request head → fit the flag headers into the
budget → take an upstream connection → write the head (the bytes the budget measured) and relay the
body → relay the response head and body back → done (or the one error path, ``fail``). Everything
that happens is written into the request's ``Exchange``; the observers read it when it is over.

The exchange is driven by hooks, not a coroutine: the client side (``client_side.ClientConnection``)
calls ``start``, ``request_body``, ``request_end``, ``client_paused``, ``client_lost``; the upstream
side (``upstream_side.UpstreamConnection`` and its ``Pool``) calls ``upstream_ready``,
``upstream_failed``, ``response_head``, ``response_body``, ``response_end``, ``response_lost``,
``upstream_paused``. Timeouts are one timer per phase (body → read → stream) plus the total and the
send-idle timers; each fires into the same error path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING

from proxy.config import Settings
from proxy.dataplane.exchange import NO_ROUTE, Exchange
from proxy.dataplane.header_fit import FlagHeaders, RequiredFlagsDoNotFit
from proxy.dataplane.header_rules import BadRequest, RequestRules, response_lines
from proxy.dataplane.messages import RequestHead
from proxy.dataplane.resolver import Resolver
from proxy.dataplane.upstream import Origin, Router, Timeouts
from proxy.dataplane.upstream_side import Pool, UpstreamConnection
from proxy.errors import error_response_bytes
from proxy.origin import sign

if TYPE_CHECKING:
    from proxy.dataplane.client_side import ClientConnection

log = logging.getLogger("flagproxy.forward")

BUFFER_LIMIT = 1 << 16  # request body bytes held while no upstream connection is ready
RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})  # idempotent
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# phases of the per-exchange idle timer
IDLE, BODY, READ, STREAM = 0, 1, 2, 3


class Forwarder:
    """What every proxied exchange shares: routes, pools, the resolver, the header rules."""

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        flag_headers: FlagHeaders,
    ) -> None:
        self.router = Router.from_settings(settings)
        self.pools: dict[int, Pool] = {}
        self.resolver = resolver
        self.flag_headers = flag_headers
        self.signature_secret = settings.header.signature_secret
        self.omitted_keys = settings.header.omitted_keys
        self.signature_name = flag_headers.names.signature.encode("latin-1")  # as configured
        self.forward_expect = settings.upstream.forward_expect
        self.rules = RequestRules(
            is_reserved=flag_headers.is_reserved,
            trusted=tuple(ipaddress.ip_network(c, strict=False) for c in settings.proxy.trusted_proxies),
            via_name=settings.proxy.via,
            forward_expect=settings.upstream.forward_expect,
            underscores=settings.proxy.underscore_headers,
        )

    async def start(self) -> None:
        self.pools = {id(origin): Pool(origin) for origin in self.router.origins}

    async def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def pool(self, origin: Origin) -> Pool:
        pool = self.pools.get(id(origin))
        if pool is None:  # served before startup (tests driving the protocol directly)
            pool = self.pools[id(origin)] = Pool(origin)
        return pool


class ProxyExchange:
    """One request forwarded to its origin."""

    __slots__ = (
        "_last",
        "_phase",
        "_send_idle",
        "_timer",
        "_total",
        "client",
        "client_eof",
        "early",
        "exchange",
        "finished",
        "fw",
        "head",
        "keep",
        "loop",
        "origin",
        "pending",
        "pending_bytes",
        "pool_",
        "request_done",
        "request_head",
        "request_id",
        "response_extra",
        "retried",
        "reused",
        "sent_at",
        "sent_continue",
        "timeouts",
        "to_client_chunked",
        "tunnel",
        "up",
        "upgrade_body",
    )

    def __init__(
        self, forwarder: Forwarder, client: ClientConnection, head: RequestHead, exchange: Exchange
    ) -> None:
        self.fw = forwarder
        self.client = client
        self.head = head
        self.exchange = exchange
        self.loop = asyncio.get_running_loop()
        self.origin: Origin | None = None
        self.pool_: Pool | None = None
        self.timeouts: Timeouts | None = None
        self.up: UpstreamConnection | None = None
        self.request_head = b""
        self.request_id = b""  # the exchange's id, encoded once for both heads
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.request_done = not head.has_body
        self.finished = False
        self.reused = False
        self.retried = False
        self.sent_continue = False
        self.tunnel = False
        self.upgrade_body = 0  # bytes of an Upgrade request's body still to relay
        self.early: list[bytes] | None = None  # the client's bytes after it, held until a 101
        self.client_eof = False
        self.keep = head.keep_alive  # keep the client connection after this exchange
        self.to_client_chunked = False
        self.response_extra: list[tuple[bytes, bytes]] = []
        self.sent_at = 0.0
        self._phase = IDLE
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._total: asyncio.TimerHandle | None = None
        self._send_idle: asyncio.TimerHandle | None = None

    # --- the request -----------------------------------------------------------------------------

    def start(self) -> None:
        """Route, resolve, rewrite, fit, then ask the pool for a connection."""
        fw, head, exchange = self.fw, self.head, self.exchange
        origin = fw.router.match(head.path.encode("utf-8"))
        if origin is None:
            exchange.origin_label = NO_ROUTE
            self.fail(404, "no_route", "no origin is configured for this path")
            return
        if not origin.strips_safely(head.raw_path):
            exchange.origin_label = origin.label
            self.fail(
                400,
                "bad_path",
                "the path, with its route prefix stripped, would leave the origin's base path",
            )
            return
        self.origin = origin
        exchange.origin = origin
        exchange.origin_label = origin.label
        self.timeouts = timeouts = origin.timeouts_for(head.path)

        resolution = fw.resolver.resolve(head.scope)
        exchange.context = resolution.context
        self.response_extra = resolution.response_headers
        request_id = self.request_id = exchange.request_id.encode("ascii")
        try:
            lines = fw.rules.rewrite(
                head.headers,
                head.lowered,
                head.client_ip,
                head.version,
                origin.netloc,
                origin.rewrite_host,
                request_id,
                head.upgrade,
            )
        except BadRequest as exc:
            self.fail(400, "bad_request", str(exc))
            return
        if head.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        target = origin.target(head.raw_path, head.query) if head.target != b"*" else b"*"
        request_line = head.method + b" " + target + b" HTTP/1.1\r\n"
        size = len(request_line) + sum(map(len, lines)) + 2

        signing_at = int(time.time()) if fw.signature_secret else 0
        if signing_at:  # room for <name>-Signature: t=…,m=…,v1=<64 hex>,p=<target>
            size += (
                len(fw.signature_name) + 4 + len(b"t=%d,m=%b,v1=,p=%b" % (signing_at, head.method, target))
            )
            size += 64
        available = origin.budget - size
        try:
            fitted, exchange.resolved = fw.flag_headers.fit_plan(
                resolution.plan, resolution.context, available
            )
        except RequiredFlagsDoNotFit as exc:
            self.fail(431, "required_flags_do_not_fit", str(exc))
            return
        exchange.fitted = fitted
        flag_headers = fitted.headers
        flag_bytes = fitted.size
        if fitted.omitted and fw.omitted_keys:
            keys = fw.flag_headers.omitted_keys_header(fitted, available - flag_bytes)
            if keys is not None:
                flag_headers = [*flag_headers, keys]
                flag_bytes += len(keys[0]) + len(keys[1]) + 4
        spelled = fw.flag_headers.spelled
        flag_lines = [spelled[name] + b": " + value + b"\r\n" for name, value in flag_headers]
        if signing_at:
            signature = self._signature(signing_at, target, flag_headers)
            flag_lines.append(fw.signature_name + b": " + signature + b"\r\n")
            flag_bytes += len(fw.signature_name) + 4 + len(signature)
        exchange.flag_header_bytes = flag_bytes
        self.request_head = request_line + b"".join(lines) + b"".join(flag_lines) + b"\r\n"
        exchange.head_bytes = len(self.request_head)

        if timeouts.total:
            self._total = self.loop.call_later(timeouts.total, self._total_over)
        if not self.request_done:
            self._enter(BODY)
        self.pool_ = fw.pool(origin)
        self.pool_.acquire(self, timeouts.connect, timeouts.pool, fresh=head.upgrade is not None)

    def _signature(self, signing_at: int, target: bytes, flag_headers: list[tuple[bytes, bytes]]) -> bytes:
        names = self.fw.flag_headers
        values = {name: value.decode("ascii") for name, value in flag_headers}
        return sign(
            self.fw.signature_secret,
            signing_at,
            self.head.method.decode("latin-1"),
            target.decode("latin-1"),
            values.get(names.name, ""),
            values.get(names.config_name, ""),
            values.get(names.omitted_name, ""),
            values.get(names.omitted_keys_name, ""),
        ).encode("ascii")

    def request_body(self, chunk: bytes) -> None:
        self._last = self.loop.time()
        self.request_body_raw(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.head.chunked else chunk)

    def request_end(self) -> None:
        self.request_done = True
        if self.head.chunked:
            self.request_body_raw(b"0\r\n\r\n")
        if self._phase == BODY:
            if self.up is not None:
                self._enter(READ)
                self.sent_at = time.perf_counter()
            else:  # the body is all here, waiting for a connection: no idle limit applies to that
                self._enter(IDLE)

    def request_body_raw(self, data: bytes) -> None:
        """Bytes for the origin as they are: written now, or held (bounded) until a connection is ready."""
        if self.up is not None:
            self.up.write(data)
        elif not self.finished:
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > BUFFER_LIMIT:
                self.client.pause_reading("buffer")

    # --- the upstream connection -----------------------------------------------------------------

    def upstream_ready(self, conn: UpstreamConnection, reused: bool) -> None:
        if self.finished:  # the client left while we waited: the connection is untouched
            if conn.pool is not None:
                conn.pool.release(conn, True)
            else:
                conn.close()
            return
        assert self.origin is not None
        self.up = conn
        self.reused = reused
        conn.begin(self, self.head.method == b"HEAD", self.origin.max_response_head_bytes)
        if self.client.writing_paused():  # the client is not reading: do not read for it either
            conn.pause()
        self.exchange.forwarded = True
        if self.pending:
            conn.write(self.request_head + b"".join(self.pending))
            self.pending = []
            self.pending_bytes = 0
            self.client.resume_reading("buffer")
        else:
            conn.write(self.request_head)
        head = self.head
        if (
            head.expect_continue
            and not self.fw.forward_expect
            and not self.request_done
            and head.version == b"1.1"
            and not self.sent_continue
        ):
            self.sent_continue = True  # ready for the body now: ask the client for it
            self.client.write(CONTINUE)
        if self.request_done:
            self.sent_at = time.perf_counter()
            self._enter(READ)

    def upstream_failed(self, status: int, error: str, detail: str, reason: str) -> None:
        if self.finished:
            return
        self.exchange.upstream_error = reason
        self.fail(status, error, detail)

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self.client.pause_reading("upstream")
        else:
            self.client.resume_reading("upstream")

    # --- the response ----------------------------------------------------------------------------

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        head, exchange, client = self.head, self.exchange, self.client
        if status < 200 and status != 101:  # interim: relayed to HTTP/1.1 clients
            if head.version == b"1.1" and not (status == 100 and self.sent_continue):
                lines, _, _ = response_lines(headers, upgrade=False)
                client.write(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, b"".join(lines)))
                if status == 100:
                    self.sent_continue = True
            return
        if exchange.upstream_latency_s is None and self.sent_at:
            exchange.upstream_latency_s = time.perf_counter() - self.sent_at
        upgraded = status == 101 and head.upgrade is not None
        lines, length, chunked = response_lines(headers, upgrade=upgraded)  # ValueError: 502
        if status == 101 and not upgraded:
            raise ValueError("101 Switching Protocols to a request that asked for no upgrade")
        if head.upgrade is not None and not upgraded:
            self.keep = False  # the client may already be speaking the new protocol
        if self.client.closing:
            self.keep = False
        no_body = head.method == b"HEAD" or status in (204, 304)
        if upgraded:
            pass
        elif no_body:
            if chunked and head.version == b"1.1" and head.method == b"HEAD":
                lines.append(b"Transfer-Encoding: chunked\r\n")
        elif length is None:
            if head.version == b"1.1":
                self.to_client_chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep = False  # HTTP/1.0: the body ends when the connection does
        if not upgraded:
            if not self.keep:
                lines.append(b"Connection: close\r\n")
            elif head.version == b"1.0":
                lines.append(b"Connection: keep-alive\r\n")
        for name, value in self.response_extra:
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"X-Request-Id: " + self.request_id + b"\r\n")
        client.write(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, b"".join(lines)))
        exchange.status = status
        exchange.response_started = True
        if upgraded:
            self._start_tunnel()
        else:
            self._enter(STREAM)

    def response_body(self, chunk: bytes) -> None:
        self._last = self.loop.time()
        self.exchange.bytes_sent += len(chunk)
        if self.to_client_chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.client.write(chunk)

    def response_end(self, reusable: bool) -> None:
        if self.finished:
            return
        if self.to_client_chunked:
            self.client.write(b"0\r\n\r\n")
        up, self.up = self.up, None
        if up is not None:
            reusable = reusable and self.request_done and not self.tunnel
            if up.pool is not None:
                up.pool.release(up, reusable)
            else:
                up.close()
        if not self.request_done:
            self.keep = False  # the client is still sending a body nobody reads
        self._finish()

    def response_lost(self, why: str, got_bytes: bool) -> None:
        """The upstream connection broke (or sent garbage) before the response was complete."""
        self.up = None
        if self.finished:
            return
        exchange = self.exchange
        if self.tunnel:
            self._finish()
            return
        head = self.head
        if (
            not got_bytes
            and self.reused
            and not self.retried
            and head.method in RETRYABLE
            and not head.has_body
            and self.pool_ is not None
            and self.timeouts is not None
        ):
            self.retried = True  # a pooled connection that died unused: once more on a fresh one
            self.reused = False
            self.pool_.acquire(self, self.timeouts.connect, self.timeouts.pool, new=True)
            return
        exchange.upstream_error = "other"
        if not exchange.response_started:
            log.warning(
                "upstream request failed: %s",
                why,
                extra={"request_id": exchange.request_id, "origin": exchange.origin_label},
            )
            self.fail(502, "bad_gateway", why)
        else:
            self._cut("upstream_closed", why)

    # --- the client connection -------------------------------------------------------------------

    def client_paused(self, paused: bool) -> None:
        """The client stopped (or started again) reading what we send."""
        up = self.up
        if paused:
            if up is not None:
                up.pause()
            send_idle = self.timeouts.send_idle if self.timeouts is not None else 0
            if send_idle and self._send_idle is None:
                self._send_idle = self.loop.call_later(send_idle, self._send_idle_over)
        else:
            if up is not None:
                up.resume()
            if self._send_idle is not None:
                self._send_idle.cancel()
                self._send_idle = None

    def client_lost(self) -> None:
        if self.finished:
            return
        exchange = self.exchange
        exchange.client_gone = True
        if not exchange.response_started:
            exchange.status = 499
        if self.pool_ is not None:
            self.pool_.cancel(self)
        up, self.up = self.up, None
        if up is not None:
            up.user = None
            up.abort()  # mid-exchange: the connection cannot be reused
        self.keep = False
        self._finish()

    def shutdown(self) -> None:
        """The shutdown grace period is over and this exchange still runs."""
        if self.finished:
            return
        log.warning(
            "shutdown grace period over: request cut short", extra={"request_id": self.exchange.request_id}
        )
        if not self.exchange.response_started:
            detail = "the proxy is shutting down and the origin did not answer within the grace period"
            self.keep = False
            self.fail(503, "shutting_down", detail)
        else:
            self._cut("shutdown", "shutting down")

    # --- tunnels (Upgrade) -----------------------------------------------------------------------

    def upgrading(self) -> bool:
        """The parser stopped at this Upgrade request's head. Its body (by ``Content-Length``) goes
        to the origin; bytes after it — the new protocol — are held until the origin answers 101,
        and dropped if it does not: never may the origin read them as another request."""
        if self.head.upgrade is None:
            return False
        self.keep = False
        self.upgrade_body = self.head.length
        self.early = []
        if self.upgrade_body == 0:
            self._upgrade_body_sent()
        return True

    def _upgrade_body_sent(self) -> None:
        self.request_done = True
        if self.up is not None and self._phase in (IDLE, BODY):
            self.sent_at = time.perf_counter()
            self._enter(READ)

    def _start_tunnel(self) -> None:
        self.tunnel = True
        self.exchange.upgraded = True
        self.keep = False
        early, self.early = self.early, None
        if early:
            self.request_body_raw(b"".join(early))
            self.client.resume_reading("buffer")
        if self.client_eof:
            self.client_tunnel_eof()
        self._enter(STREAM)

    def tunnel_data(self, data: bytes) -> None:
        """Bytes from the origin after the 101."""
        self._last = self.loop.time()
        self.exchange.bytes_sent += len(data)
        self.client.write(data)

    def tunnel_eof(self) -> None:
        self.client.write_eof()

    def client_tunnel_data(self, data: bytes) -> None:
        """The client's bytes after an Upgrade request's head."""
        self._last = self.loop.time()
        if self.tunnel:
            self.request_body_raw(data)
            return
        if self.upgrade_body:  # the request's own body first
            body, data = data[: self.upgrade_body], data[self.upgrade_body :]
            self.upgrade_body -= len(body)
            self.request_body_raw(body)
            if not self.upgrade_body:
                self._upgrade_body_sent()
        if data and self.early is not None:  # the new protocol's first bytes: held until the 101
            self.early.append(data)
            if sum(map(len, self.early)) > BUFFER_LIMIT:
                self.client.pause_reading("buffer")

    def client_tunnel_eof(self) -> None:
        if not self.tunnel:
            self.client_eof = True  # passed on once the tunnel is up
            return
        up = self.up
        if up is not None and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()

    # --- timers ----------------------------------------------------------------------------------

    def _limit(self) -> float:
        t = self.timeouts
        if t is None:
            return 0.0
        phase = self._phase
        if phase == BODY:
            return t.body_idle
        if phase == READ:
            return t.read
        if phase == STREAM:
            return t.stream_idle
        return 0.0

    def _enter(self, phase: int) -> None:
        """Start a phase. A timer already armed to fire no later than this phase's limit is kept (it
        re-checks when it fires): most exchanges arm one timer, not one per phase."""
        self._phase = phase
        now = self._last = self.loop.time()
        limit = self._limit()
        timer = self._timer
        if timer is not None:
            if not limit or timer.when() <= now + limit:
                return
            timer.cancel()
            self._timer = None
        if limit:
            self._timer = self.loop.call_later(limit, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.finished:
            return
        limit = self._limit()
        if not limit:
            return
        now = self.loop.time()
        due = self._last + limit
        if self._phase == BODY and self.client.reading_paused():
            due = now + limit  # we stopped reading: the client is not the one being slow
        elif self._phase == STREAM and self.up is not None and self.up.paused and not self.tunnel:
            due = now + limit  # the client is not reading (send_idle_timeout_s), not the origin
        if due > now + 0.001:
            self._timer = self.loop.call_later(due - now, self._tick)
            return
        phase, exchange = self._phase, self.exchange
        if phase == BODY:
            if exchange.response_started:
                self._cut("body_idle", "the request body stalled")
            else:
                self.keep = False
                self.fail(
                    408, "body_timeout", f"the request body stalled for {limit:g} s (body_idle_timeout_s)"
                )
        elif phase == READ:
            exchange.upstream_error = "timeout"
            self.fail(
                504, "gateway_timeout", f"the origin did not answer within {limit:g} s (read_timeout_s)"
            )
        else:
            exchange.upstream_error = "stream_idle"
            self._cut("stream_idle", f"no bytes for {limit:g} s (stream_idle_timeout_s)")

    def _total_over(self) -> None:
        self._total = None
        if self.finished:
            return
        self.exchange.upstream_error = "total"
        if self.exchange.response_started:
            self._cut("total", "total_timeout_s")
        else:
            assert self.timeouts is not None
            detail = f"the exchange took longer than {self.timeouts.total:g} s (total_timeout_s)"
            self.fail(504, "gateway_timeout", detail)

    def _send_idle_over(self) -> None:
        self._send_idle = None
        if not self.finished:
            self._cut("send_idle", "the client stopped reading (send_idle_timeout_s)")

    # --- the ends --------------------------------------------------------------------------------

    def fail(self, status: int, error: str, detail: str) -> None:
        """The one error path: a JSON answer to the client (the response had not started)."""
        exchange = self.exchange
        if not self.request_done:
            self.keep = False  # an unread body follows: the connection cannot carry another request
        body = error_response_bytes(status, error, detail, exchange.request_id, close=not self.keep)
        self.client.write(body)
        exchange.status = status
        exchange.response_started = True
        exchange.bytes_sent = len(body) - body.index(b"\r\n\r\n") - 4
        self._drop_upstream()
        self._finish()

    def _cut(self, why: str, detail: str) -> None:
        """The response started and cannot finish: the client sees it incomplete (no last chunk)."""
        exchange = self.exchange
        exchange.cut = why
        log.warning(
            "response cut: %s",
            detail,
            extra={"request_id": exchange.request_id, "origin": exchange.origin_label, "cut": why},
        )
        self.keep = False
        self._drop_upstream()
        self.client.abort()
        self._finish()

    def _drop_upstream(self) -> None:
        if self.pool_ is not None:
            self.pool_.cancel(self)
        up, self.up = self.up, None
        if up is not None:
            up.user = None
            up.abort()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for timer in (self._timer, self._total, self._send_idle):
            if timer is not None:
                timer.cancel()
        self._timer = self._total = self._send_idle = None
        self.pending = []
        self.client.exchange_done(self, self.keep)
