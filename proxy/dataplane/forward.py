"""Data plane: forward one request to its origin, streaming both ways, flags added on the way.

Read top to bottom: route → resolve flags → rewrite request headers → fit the flag headers into the
budget → send upstream → rewrite response headers → stream the body back. Everything that happens is
written into the request's ``Exchange``; the observers read it when the request is over.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from proxy.asgi import Header, Receive, Scope, Send
from proxy.config import Settings
from proxy.dataplane.exchange import NO_ROUTE, Exchange
from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.header_rules import BadRequest, RequestRules, has_body, response_headers
from proxy.dataplane.resolver import Resolver
from proxy.dataplane.upstream import Origin, Router, head_size
from proxy.errors import send_error
from proxy.origin import sign

log = logging.getLogger("flagproxy.forward")


class ClientGone(Exception):
    """The downstream client disconnected while we were reading its request body."""


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


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """While a request waits for its origin: after ``after_s`` (fast answers cost one timer), and once
    its body (if any) is all read, watch for the client leaving and cancel the wait when it does (499).
    Until the body is complete the body reader is the one calling ``receive`` and notices instead."""

    after_s = 0.05
    __slots__ = ("_body", "_exchange", "_handle", "_receive", "_task", "_waiting", "_watcher")

    def __init__(self, exchange: Exchange, receive: Receive, body: RequestBody | None) -> None:
        self._exchange = exchange
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
            self._exchange.client_gone = True
            self._task.cancel()

    def stop(self) -> None:
        self._waiting = False
        self._handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class Forwarder:
    """The raw ASGI handler for proxied traffic (no framework objects on this path)."""

    def __init__(self, settings: Settings, resolver: Resolver, flag_headers: FlagHeaders) -> None:
        self.router = Router.from_settings(settings)
        self.resolver = resolver
        self.flag_headers = flag_headers
        self.signature_secret = settings.header.signature_secret
        self.signature_name = flag_headers.names.signature
        self.rules = RequestRules(
            is_reserved=flag_headers.is_reserved,
            trusted=tuple(ipaddress.ip_network(c, strict=False) for c in settings.proxy.trusted_proxies),
            via_name=settings.proxy.via,
        )

    async def start(self) -> None:
        for origin in self.router.origins:
            await origin.open()

    async def close(self) -> None:
        for origin in self.router.origins:
            await origin.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        origin = self.router.match(raw_path)
        if origin is None or origin.session is None:
            exchange.origin_label = NO_ROUTE
            detail = "no origin is configured for this path"
            exchange.bytes_sent = await send_error(send, 404, "no_route", detail, exchange.request_id)
            exchange.status = 404
            return
        exchange.origin = origin
        exchange.origin_label = origin.label
        try:
            exchange.status = await self.forward(scope, receive, send, exchange, origin, raw_path)
        except asyncio.CancelledError:
            if exchange.client_gone:
                exchange.status = 499  # DisconnectWatch stopped the wait: nobody to answer
            else:
                exchange.status = await self.cut_short(send, exchange)

    @staticmethod
    async def cut_short(send: Send, exchange: Exchange) -> int:
        """uvicorn cancels what still runs when the shutdown grace period ends: say so in JSON (503)
        when the response has not started, else end here (the client sees a cut body)."""
        log.warning(
            "shutdown grace period over: request cut short", extra={"request_id": exchange.request_id}
        )
        if exchange.response_started:
            return exchange.status
        detail = "the proxy is shutting down and the origin did not answer within the grace period"
        exchange.bytes_sent = await send_error(send, 503, "shutting_down", detail, exchange.request_id)
        return 503

    async def fail(self, send: Send, exchange: Exchange, status: int, error: str, detail: str) -> int:
        """The one error path: a JSON answer to the client, its size in the exchange."""
        exchange.bytes_sent = await send_error(send, status, error, detail, exchange.request_id)
        return status

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, exchange: Exchange, origin: Origin, raw_path: bytes
    ) -> int:
        """Forward one request; the status the client got (499 when it left before a response)."""
        resolution = self.resolver.resolve(scope)
        exchange.context = resolution.context
        exchange.resolved = resolution.resolved
        request_id = exchange.request_id
        try:
            headers = self.rules.rewrite(scope, origin.netloc, origin.rewrite_host, request_id)
        except BadRequest as exc:
            return await self.fail(send, exchange, 400, "bad_request", str(exc))
        body = RequestBody(receive) if has_body(scope["headers"]) else None
        target = origin.target(raw_path, scope.get("query_string", b""))
        method = scope["method"]

        head = head_size(method, target, headers, body is not None)
        signing_at = int(time.time()) if self.signature_secret else 0
        signature_name = self.signature_name
        if signing_at:  # room for <name>-Signature: t=…,m=…,v1=<64 hex>,p=<target>
            head += len(signature_name) + 4 + len(f"t={signing_at},m={method},v1=,p={target}") + 64
        fitted = self.flag_headers.fit(resolution.resolved, origin.budget - head)
        exchange.fitted = fitted
        for name, value in fitted.headers:
            headers.append((name.decode("latin-1"), value.decode("ascii")))
        flag_bytes = fitted.size
        if signing_at:
            names = self.flag_headers
            values = {name: value.decode("ascii") for name, value in fitted.headers}
            signature = sign(
                self.signature_secret,
                signing_at,
                method,
                target,
                values.get(names.name, ""),
                values.get(names.config_name, ""),
                values.get(names.omitted_name, ""),
            )
            headers.append((signature_name, signature))
            flag_bytes += len(signature_name) + 4 + len(signature)
        exchange.flag_header_bytes = flag_bytes
        exchange.head_bytes = head + fitted.size
        url = URL(origin.base + target, encoded=True)

        started = time.perf_counter()
        # A slow origin: notice a client that leaves meanwhile and stop waiting for the origin.
        watch = DisconnectWatch(exchange, receive, body)
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
            exchange.upstream_error = "timeout"
            return await self.fail(
                send, exchange, 504, "gateway_timeout", "the origin did not answer in time"
            )
        except aiohttp.ClientConnectorError as exc:
            exchange.upstream_error = "connect"
            reason = exc.os_error.strerror or exc
            return await self.fail(send, exchange, 502, "bad_gateway", f"origin unreachable: {reason}")
        except (aiohttp.ClientError, OSError) as exc:
            if body is not None and isinstance(exc.__cause__, ClientGone):
                return 499
            exchange.upstream_error = "other"
            log.warning(
                "upstream request failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"request_id": request_id, "origin": origin.label},
            )
            detail = f"origin request failed: {type(exc).__name__}"
            return await self.fail(send, exchange, 502, "bad_gateway", detail)
        finally:
            watch.stop()
        exchange.upstream_latency_s = time.perf_counter() - started

        try:
            await self.stream_response(receive, send, exchange, response, body, resolution.response_headers)
        finally:
            response.release()
        return response.status

    async def stream_response(
        self,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        response: aiohttp.ClientResponse,
        body: RequestBody | None,
        extra_headers: list[Header],
    ) -> None:
        headers = response_headers(response.raw_headers)
        if extra_headers:
            headers.extend(extra_headers)
        headers.append((b"x-request-id", exchange.request_id.encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        exchange.status = response.status
        exchange.response_started = True

        content = response.content
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "origin response broke before its body: %s",
                type(exc).__name__,
                extra={"request_id": exchange.request_id},
            )
            return
        if content.at_eof():
            await send({"type": "http.response.body", "body": chunk})
            exchange.bytes_sent = len(chunk)
            return

        # A longer body: watch for the client going away so the upstream connection is freed at once.
        watcher = None
        if body is None or body.complete:
            watcher = asyncio.ensure_future(wait_for_disconnect(receive))
            watcher.add_done_callback(lambda task: None if task.cancelled() else response.close())
        sent = 0
        try:
            while chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
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
                    extra={"request_id": exchange.request_id},
                )
        finally:
            exchange.bytes_sent = sent
            if watcher is not None:
                watcher.cancel()
