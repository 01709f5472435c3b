"""The upstream side: a keep-alive pool per origin and the connection protocol that reads responses.

An ``UpstreamConnection`` serves one exchange at a time (its ``user``, a ``ProxyExchange``) and tells
it what happens through named hooks: ``upstream_ready`` / ``upstream_failed`` (from the pool),
``response_head``, ``response_body``, ``response_end``, ``response_lost`` and ``upstream_paused``.
httptools parses the responses; one parser per connection, and a fresh one around a response to
HEAD, because httptools cannot be told that such a response has no body (MagicStack/httptools#47).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Coroutine
from typing import Protocol

import httptools

from proxy.dataplane.upstream import Origin

log = logging.getLogger("flagproxy.upstream")


class ResponseTooLarge(Exception):
    """The origin's response head exceeds ``[upstream] max_response_head_bytes``."""


class User(Protocol):
    """What an upstream connection reports to (``forward.ProxyExchange``)."""

    def upstream_ready(self, conn: UpstreamConnection, reused: bool) -> None: ...
    def upstream_failed(self, status: int, error: str, detail: str, reason: str) -> None: ...
    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None: ...
    def response_body(self, chunk: bytes) -> None: ...
    def response_end(self, reusable: bool) -> None: ...
    def response_lost(self, why: str, got_bytes: bool) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> None: ...


class Pool:
    """Keep-alive connections to one origin: at most ``pool_limit`` open; beyond that a request waits
    up to its pool timeout for one to come back, then gets 503 ``pool_exhausted``."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # pooled connections open or connecting
        self.waiters: deque[tuple[User, float, asyncio.TimerHandle]] = deque()
        self.closed = False
        self._ssl = origin.ssl_context()
        self._connecting: set[asyncio.Future[None]] = set()

    def acquire(
        self, user: User, connect_s: float, pool_s: float, fresh: bool = False, new: bool = False
    ) -> None:
        """Hand ``user`` a connection (``upstream_ready``) or the reason there is none. ``fresh``:
        its own connection outside the pool (an upgrade: it becomes a tunnel); ``new``: a pooled
        connection, but not an idle one (the retry after an idle one died)."""
        if fresh:
            self._spawn(self._connect(user, connect_s, pooled=False))
            return
        idle = [] if new else self.idle
        if idle:
            expired = asyncio.get_running_loop().time() - self.origin.keepalive_timeout_s
        while idle:
            conn = idle.pop()
            if conn.idle_since < expired:
                conn.close()  # idle too long: the origin may be closing it right now
            elif conn.usable():
                conn.take()
                user.upstream_ready(conn, True)
                return
        if self.open < self.origin.pool_limit:
            self.open += 1
            self._spawn(self._connect(user, connect_s, pooled=True))
            return
        loop = asyncio.get_running_loop()
        entry: tuple[User, float, asyncio.TimerHandle] = (
            user,
            connect_s,
            loop.call_later(pool_s, self._expire),
        )
        self.waiters.append(entry)

    def _spawn(self, connecting: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(connecting)
        self._connecting.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._connecting.discard)

    def cancel(self, user: User) -> None:
        """``user`` no longer waits (its client left)."""
        for entry in list(self.waiters):
            if entry[0] is user:
                entry[2].cancel()
                self.waiters.remove(entry)

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        while self.waiters and self.waiters[0][2].when() <= now + 0.001:
            user, _, _ = self.waiters.popleft()
            user.upstream_failed(
                503,
                "pool_exhausted",
                f"all {self.origin.pool_limit} connections to the origin are busy "
                "([upstream] pool_limit); no connection came free within [upstream] pool_timeout_s",
                "pool_exhausted",
            )

    async def _connect(self, user: User, connect_s: float, pooled: bool) -> None:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            connecting = loop.create_connection(
                lambda: UpstreamConnection(self if pooled else None),
                origin.host,
                origin.port,
                ssl=self._ssl,
                server_hostname=origin.host if self._ssl else None,
            )
            _, conn = await asyncio.wait_for(connecting, connect_s) if connect_s else await connecting
        except OSError as exc:  # TimeoutError and ssl.SSLError included
            if pooled:
                self.open -= 1
                self._hand_on()
            if isinstance(exc, TimeoutError):
                detail = f"origin unreachable: no connection within {connect_s:g} s"
            else:  # the client is told what failed, never where: the address is for the log
                detail = f"origin unreachable: {_connect_error(exc)}"
                log.warning(
                    "cannot connect to the origin %s at %s:%d: %s",
                    origin.label,
                    origin.host,
                    origin.port,
                    exc,
                    extra={"origin": origin.label},
                )
            user.upstream_failed(502, "bad_gateway", detail, "connect")
            return
        conn.counted = pooled  # from now on its close frees the slot (not before: see the except)
        conn.take()
        user.upstream_ready(conn, False)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange is done with ``conn``: next waiter, the idle list, or closed."""
        conn.user = None
        if not reusable or self.closed or not conn.usable():
            conn.close()
            return
        conn.resume()
        if self.waiters:
            user, _, timer = self.waiters.popleft()
            timer.cancel()
            conn.take()
            user.upstream_ready(conn, True)
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def _hand_on(self) -> None:
        """A pooled slot came free: the first waiter connects."""
        if self.waiters and self.open < self.origin.pool_limit and not self.closed:
            user, connect_s, timer = self.waiters.popleft()
            timer.cancel()
            self.open += 1
            self._spawn(self._connect(user, connect_s, pooled=True))

    def gone(self, conn: UpstreamConnection) -> None:
        """A pooled connection closed."""
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._hand_on()

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One connection to an origin; httptools parses what it answers."""

    def __init__(self, pool: Pool | None) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.user: User | None = None
        self.closed = False
        self.tunnel = False
        self.counted = False  # holds one of the pool's slots (a connect that timed out never did)
        self.idle_since = 0.0
        self._head_request = False
        self._got = False  # a response byte arrived for the current exchange
        self._in_head = False
        self._head_bytes = 0
        self._head_limit = 65536
        self._status = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._done = False
        self._close_delimited = False
        self._parser: httptools.HttpResponseParser | None = None
        self._paused = False
        self._keep_alive = False

    # --- connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def take(self) -> None:
        self.idle_since = 0.0

    def begin(self, user: User, head_request: bool, head_limit: int) -> None:
        """Start an exchange: the caller writes its request next."""
        self.user = user
        if head_request or self._head_request or self._parser is None:
            # after a response to HEAD the parser may still wait for a body that never comes
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._head_limit = head_limit
        self._got = False
        self._done = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    @property
    def paused(self) -> bool:
        """Reading from the origin is paused (its client is not reading)."""
        return self._paused

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        user = self.user
        if self.tunnel:
            if user is not None:
                user.tunnel_data(data)
            return
        if user is None or self._parser is None:  # an idle connection spoke unasked: not reusable
            self.close()
            return
        self._got = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # 101: from here on the bytes belong to the tunnel
            self.tunnel = True
            rest = data[exc.args[0] :]
            if rest:
                user.tunnel_data(rest)
            return
        except httptools.HttpParserError as exc:
            self.abort()
            cause = exc.__context__
            if isinstance(cause, ResponseTooLarge):
                why = (
                    f"the origin's response head exceeds {self._head_limit} bytes "
                    "([upstream] max_response_head_bytes)"
                )
            elif isinstance(cause, ValueError) and cause.args:
                why = f"the origin sent a malformed response: {cause.args[0]}"
            else:
                why = f"the origin sent a malformed response: {exc}"
            self.user = None
            user.response_lost(why, True)
            return
        if self._done:
            self._done = False
            reusable = self._keep_alive and not self._close_delimited
            user.response_end(reusable)

    def eof_received(self) -> bool | None:
        user = self.user
        if self.tunnel:
            if user is not None:
                user.tunnel_eof()
            return True  # keep the other direction open
        if user is not None and self._close_delimited and not self._in_head:
            self._close_delimited = False
            user.response_end(False)  # the body ended with the connection
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pool is not None and self.counted:
            self.counted = False
            self.pool.gone(self)
        user, self.user = self.user, None
        if user is None:
            return
        if self.tunnel:
            user.tunnel_eof()
            user.response_lost("tunnel closed by the origin", True)
            return
        user.response_lost("the origin closed the connection", self._got)

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(False)

    # --- httptools response callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._status = b""
        self._headers = []

    def on_status(self, status: bytes) -> None:
        self._count(len(status) + 15)
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self._headers.append((name, value))

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._head_limit:
            raise ResponseTooLarge()

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        assert parser is not None and self.user is not None
        status = parser.get_status_code()
        self._keep_alive = keep_alive = parser.should_keep_alive()  # llhttp forgets it at message end
        if status >= 200 and not self._head_request and status not in (204, 304):
            names = [n.lower() for n, _ in self._headers]
            self._close_delimited = b"content-length" not in names and b"transfer-encoding" not in names
        else:
            self._close_delimited = False
        self.user.response_head(status, self._status, self._headers, keep_alive)
        if self._head_request and status >= 200:
            self._done = True  # no body follows a response to HEAD, whatever its headers say

    def on_body(self, body: bytes) -> None:
        if self._head_request or self.user is None:
            return
        self.user.response_body(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        if parser is None or self._head_request:
            return
        if 100 <= parser.get_status_code() < 200:
            return  # an interim response: the final one follows on the same parser
        self._done = True


def _connect_error(exc: OSError) -> str:
    """What went wrong connecting, without the address (``strerror`` names it for asyncio's errors)."""
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, socket.gaierror):
        return "the origin's host name does not resolve"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__
