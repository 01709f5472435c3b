"""The client side: one asyncio protocol per client connection, the class uvicorn serves (``http=``).

httptools parses the client's requests. Each request head becomes a ``RequestHead`` and an
``Exchange``, then an exchange object serves it: a ``forward.ProxyExchange`` for proxied paths, a
``control_cycle.ControlExchange`` (an ASGI cycle into Starlette) under the control prefix.
Pipelined requests queue and are answered in order; the connection enforces what belongs to it:

- ``[server] header_timeout_s``: a request head must be complete this long after the connection
  began waiting for it (408 + close when part of it came; a silent close when none did), and an idle
  keep-alive connection is closed after ``[server] keepalive_timeout_s``;
- ``[server] max_request_head_bytes`` (431), malformed framing or a ``Content-Length`` that is not
  digits only (400), ``CONNECT`` (405) — each a JSON answer, then close;
- ``[server] max_connections`` per worker: beyond it a new connection gets 503 and is closed;
- flow control: reading pauses while what the client sent cannot move on (no upstream yet, upstream
  not draining, too many pipelined requests); a half-closed client still gets its answer.
uvicorn still runs the server: sockets, workers, lifespan, signals; its graceful shutdown calls
``shutdown`` on every connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from random import getrandbits
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.header_rules import DIGITS, request_id_of
from proxy.dataplane.messages import RequestHead
from proxy.dataplane.paths import BadPath, normalise
from proxy.errors import error_response_bytes

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.dataplane.forward import ProxyExchange
    from proxy.metrics import Metrics

ACCESS_LOG = logging.getLogger("flagproxy.access")
log = logging.getLogger("flagproxy.client")
PIPELINE_LIMIT = 16  # parsed requests waiting behind the one being answered


def new_request_id() -> str:
    """16 hex digits; unique enough to find a request in logs (not a secret: no system call)."""
    return f"{getrandbits(64):016x}"


class Served(Protocol):
    """What serves one request on a connection (``ProxyExchange``, ``ControlExchange``)."""

    exchange: Exchange
    head: RequestHead

    def start(self) -> None: ...
    def request_body(self, chunk: bytes) -> None: ...
    def request_end(self) -> None: ...
    def client_paused(self, paused: bool) -> None: ...
    def client_lost(self) -> None: ...
    def shutdown(self) -> None: ...
    def upgrading(self) -> bool: ...
    def client_tunnel_data(self, data: bytes) -> None: ...
    def client_tunnel_eof(self) -> None: ...


class Refused(Exception):
    """A request the connection answers itself and then closes."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class Finish(Protocol):
    def finish(self, exchange: Exchange) -> None: ...


class ProxyApp(Protocol):
    """What the connection needs of the app (``proxy.app.FlagProxy``)."""

    settings: Settings
    metrics: Metrics
    observers: Finish  # the observers get each exchange when it is over
    control_prefix: str
    control_prefix_slash: str

    def proxied(self, client: ClientConnection, head: RequestHead, exchange: Exchange) -> ProxyExchange: ...

    async def control_exchange(self, scope: Any, receive: Any, send: Any, exchange: Exchange) -> None: ...

    def draining(self) -> None: ...


def find_proxy(app: Any) -> ProxyApp:
    """The flagproxy app inside whatever uvicorn wrapped around it (its middlewares keep ``.app``)."""
    for _ in range(8):
        if hasattr(app, "proxied") and hasattr(app, "control_exchange"):
            return app  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
    raise RuntimeError("the flagproxy connection protocol serves a flagproxy app (proxy.app.FlagProxy)")


class ClientConnection(asyncio.Protocol):
    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any] | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app = find_proxy(config.loaded_app)
        self.server_state = server_state
        self.loop = _loop or asyncio.get_event_loop()
        server = self.app.settings.server
        self.header_timeout = server.header_timeout_s
        self.keepalive_timeout = server.keepalive_timeout_s
        self.max_head = server.max_request_head_bytes
        self.max_connections = server.max_connections
        self.grace = server.shutdown_grace_s
        self.control_prefix = self.app.control_prefix
        self.control_prefix_slash = self.app.control_prefix_slash
        self.control_port = server.control_port  # 0: the control plane shares the traffic port
        self.on_control_port = False  # this connection came in on [server] control_port
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.sockname: tuple[str, int] | None = None
        self.queue: deque[Served] = deque()
        self.receiving: Served | None = None  # the request whose body the parser is reading
        self.tunnel: Served | None = None  # after an Upgrade head: bytes go to it as they come
        self.closing = False  # shutting down: no request after the current one
        self.closed = False
        self.half_closed = False
        self._last_request = False
        self.requests = 0
        self._paused_by: set[str] = set()
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._wait_timer: asyncio.TimerHandle | None = None
        self._wait_since = 0.0
        self._grace_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)

    # --- connection events -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("sockname")
        self.sockname = (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else None
        self.on_control_port = (
            bool(self.control_port) and self.sockname is not None and (self.sockname[1] == self.control_port)
        )
        connections = self.server_state.connections
        if len(connections) >= self.max_connections:
            self.app.metrics.rejected("too_many_connections")
            detail = f"the proxy holds {self.max_connections} connections ([server] max_connections)"
            tr.write(error_response_bytes(503, "too_many_connections", detail, new_request_id()))  # type: ignore[attr-defined]
            tr.close()
            self.closed = True
            return
        connections.add(self)
        self._wait(first=True)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.client_tunnel_data(data)
            return
        if self.closed or self._last_request:
            return  # after a request that closes the connection, nothing more is read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An upgrade request: the parser stops at its head. What follows (a body, the new
            # protocol's first bytes) is relayed as it comes; the connection ends with this exchange
            # unless the origin switches protocols.
            served = self.queue[-1] if self.queue else None
            if served is None or not served.upgrading():
                self._refuse(400, "bad_request", "an upgrade request nothing can serve")
                return
            self.tunnel = served
            rest = data[exc.args[0] :]
            if rest:
                served.client_tunnel_data(rest)
        except httptools.HttpParserError as exc:
            if self._last_request:
                return  # bytes after a request that closes the connection: not a request of ours
            cause = exc.__context__
            if isinstance(cause, Refused):
                self._refuse(cause.status, cause.error, cause.detail)
            else:
                self._refuse(400, "bad_request", f"malformed HTTP request: {exc}")
        else:
            if self._in_head:  # one endless header line counts too
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head:
                    self._refuse(431, "request_head_too_large", f"request head exceeds {self.max_head} bytes")

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.client_tunnel_eof()
            return True
        if not self.queue:
            return None  # nothing asked, nothing owed: close
        if self.receiving is not None or self.queue[0].exchange.response_started:
            return None  # mid-body or mid-response: the client left (connection_lost follows)
        self.half_closed = True  # the whole request came, then a half-close: it still gets its answer
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server_state.connections.discard(self)
        for timer in (self._wait_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self.queue:
            active = self.queue[0]
            self.queue = deque([active])
            active.client_lost()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.queue:
            self.queue[0].client_paused(True)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.queue:
            self.queue[0].client_paused(False)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def shutdown(self) -> None:
        """uvicorn is shutting down: finish what runs (within the grace period), start nothing new."""
        self.closing = True
        self.app.draining()  # long-lived control responses (live-update streams) end now
        if not self.queue:
            self.close()
            return
        delay = self.grace  # uvicorn stops waiting a little later (it sleeps 0.1 s before it starts)
        self._grace_timer = self.loop.call_later(delay, self._grace_over)

    def _grace_over(self) -> None:
        self._grace_timer = None
        if self.queue:
            self.queue[0].shutdown()

    # --- what exchanges call ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and transport.can_write_eof():
            transport.write_eof()

    async def drain(self) -> None:
        """Wait while the client is not reading (the control plane's ``send``)."""
        if self._writing_paused and not self.closed:
            if self._drained is None or self._drained.done():
                self._drained = self.loop.create_future()
            await self._drained

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def reading_paused(self) -> bool:
        return bool(self._paused_by)

    def writing_paused(self) -> bool:
        return self._writing_paused

    def exchange_done(self, served: Served, keep: bool) -> None:
        """``served`` has answered (or given up); the next request, or close."""
        self.requests += 1
        self.server_state.total_requests += 1
        self.app.observers.finish(served.exchange)
        if self.queue and self.queue[0] is served:
            self.queue.popleft()
        if self.closed:
            return
        if not keep or (self.closing and not self.queue) or (self.half_closed and not self.queue):
            self.close()
            return
        for reason in ("buffer", "control", "upstream"):  # what the finished exchange paused for
            self.resume_reading(reason)
        if len(self.queue) <= PIPELINE_LIMIT:
            self.resume_reading("pipeline")
        if self.queue:
            following = self.queue[0]
            following.start()
            if self._writing_paused and not self.closed and self.queue and self.queue[0] is following:
                following.client_paused(True)  # asyncio said so once, to the one before it
        else:
            self._wait(first=False)

    # --- waiting for a request head --------------------------------------------------------------

    def _wait(self, first: bool) -> None:
        self._wait_since = self.loop.time()
        delay = self.header_timeout if first else min(self.header_timeout, self.keepalive_timeout)
        if self._wait_timer is not None:
            self._wait_timer.cancel()
        self._wait_timer = self.loop.call_later(delay, self._wait_over)

    def _wait_over(self) -> None:
        self._wait_timer = None
        if self.closed or self.queue:
            return
        if not self._in_head:
            self.close()  # idle keep-alive (or a connection that never spoke)
            return
        waited = self.loop.time() - self._wait_since
        if waited < self.header_timeout - 0.001:
            self._wait_timer = self.loop.call_later(self.header_timeout - waited, self._wait_over)
            return
        self._refuse(
            408, "header_timeout", f"the request head did not arrive within {self.header_timeout:g} s"
        )

    # --- httptools request callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self._headers.append((name, value))

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head:
            raise Refused(
                431, "request_head_too_large", f"request line and headers exceed {self.max_head} bytes"
            )

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._wait_timer is not None and not self.queue:
            self._wait_timer.cancel()
            self._wait_timer = None
        head = self._head()
        exchange = Exchange(
            head.scope["method"],
            head.path,
            head.client_ip,
            request_id_of(head.scope["headers"]) or new_request_id(),
        )
        served: Served
        if self.control_port and not self.on_control_port and self._is_control(head.path):
            raise Refused(
                404, "not_found", "the control plane is not served on this port: see [server] control_port"
            )
        if self.on_control_port or self._is_control(head.path):
            from proxy.dataplane.control_cycle import ControlExchange

            exchange.control = True
            served = ControlExchange(self, head, exchange)
        else:
            served = self.app.proxied(self, head, exchange)
        self.receiving = served
        self.queue.append(served)
        if len(self.queue) == 1:
            served.start()
        elif len(self.queue) > PIPELINE_LIMIT:
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        if self.receiving is not None:
            self.receiving.request_body(body)

    def on_message_complete(self) -> None:
        receiving, self.receiving = self.receiving, None
        if receiving is not None and not receiving.head.keep_alive and receiving.head.upgrade is None:
            self._last_request = True  # Connection: close, or HTTP/1.0: this request is the last
            self.pause_reading("last request")
        if receiving is not None:
            receiving.request_end()

    def _is_control(self, path: str) -> bool:
        """Decided on the normalised path, as Starlette routes it: ``/%5F%5Fflags/``, ``//__flags/`` and
        ``/x/../__flags/`` are the control plane."""
        return path == self.control_prefix or path.startswith(self.control_prefix_slash)

    def _head(self) -> RequestHead:
        """The parsed head, checked: framing the parser lets through but a proxy must not."""
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise Refused(405, "method_not_allowed", "CONNECT is not served: this is a reverse proxy")
        headers = self._headers
        lowered = [name.lower() for name, _ in headers]
        chunked = False
        length = 0
        upgrade = None
        expect = False
        for (_, value), low in zip(headers, lowered, strict=True):
            if low == b"content-length":
                if not DIGITS.fullmatch(value):
                    raise Refused(400, "bad_request", "Content-Length must be digits only")
                length = int(value)
            elif low == b"transfer-encoding":
                chunked = True
            elif low == b"upgrade":
                upgrade = value
            elif low == b"expect" and value.lower() == b"100-continue":
                expect = True
        if not parser.should_upgrade():
            upgrade = None
        elif chunked:  # its body could not be told from the new protocol's bytes without parsing
            raise Refused(400, "bad_request", "an Upgrade request with a chunked body is not served")
        target = self._url
        if target.startswith(b"/") or target == b"*":
            raw_path, sep, query = target.partition(b"?")
        else:  # absolute-form (RFC 9112 §3.2.2): the path and query of the URL
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                raise Refused(400, "bad_request", "invalid request target") from None
            raw_path = url.path or b"/"
            _, sep, query = target.partition(b"?")
        try:  # what routing, flag routes and the control-prefix check see
            path = normalise(raw_path, self.control_prefix)
        except BadPath as exc:
            raise Refused(400, "bad_path", str(exc)) from None
        version = parser.get_http_version().encode("ascii")
        lowered_headers = [(low, value) for low, (_, value) in zip(lowered, headers, strict=True)]
        # what the context builder reads; a control-plane request completes it into an ASGI scope
        scope: dict[str, Any] = {
            "method": method.decode("ascii"),
            "path": path,
            "query_string": query,
            "headers": lowered_headers,
            "client": self.peer,
        }
        return RequestHead(
            method=method,
            target=target,
            raw_path=raw_path,
            query=query if sep else None,
            path=path,
            version=version,
            headers=headers,
            lowered=lowered,
            client=self.peer,
            keep_alive=parser.should_keep_alive(),
            chunked=chunked,
            has_body=chunked or length > 0,
            length=length,
            upgrade=upgrade,
            expect_continue=expect,
            scope=scope,
        )

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Answer at once and close: after a framing error the byte stream cannot be trusted."""
        client = self.peer[0] if self.peer else None
        request_id = new_request_id()  # the head could not be trusted: a fresh id, not the client's
        logger = ACCESS_LOG if ACCESS_LOG.isEnabledFor(logging.INFO) else log
        logger.info(
            "rejected a request from %s: %s",
            client,
            detail,
            extra={
                "event": "rejected",
                "status": status,
                "error": error,
                "client": client,
                "request_id": request_id,
            },
        )
        self.app.metrics.rejected(error)
        answering = bool(self.queue) and self.queue[0].exchange.response_started
        self.closed = True
        if self.queue:  # the request being answered ends here too
            active = self.queue[0]
            self.queue = deque([active])
            if not answering:  # it gets this answer
                active.exchange.status = status
                active.exchange.response_started = True
            active.client_lost()
        if self.transport is not None and not self.transport.is_closing():
            if not answering:
                self.transport.write(error_response_bytes(status, error, detail, request_id))
            self.transport.close()
