"""A control-plane request served from the connection protocol: one ASGI HTTP cycle into Starlette.

The request body reaches ``receive`` as it arrives (reading pauses past 64 KiB unread); ``send``
frames the response for the client — ``Content-Length`` when the app gives one, else chunked
(HTTP/1.1) or close-delimited (HTTP/1.0) — and waits while the client is not reading. The task runs
in uvicorn's task set, so shutdown waits for it and cancels it at the end of the grace period.

The data plane's idle limits hold here too: a body that stalls for ``[server] body_idle_timeout_s``
is answered 408 (or the connection cut, once a response started) and the app sees a disconnect; a
client that keeps its receive window shut for ``[server] send_idle_timeout_s`` is cut, and every
later ``send`` returns at once (an event stream to a client that stopped reading ends).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

from proxy.asgi import Message
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.messages import RequestHead
from proxy.errors import error_response_bytes

if TYPE_CHECKING:
    from proxy.dataplane.client_side import ClientConnection

log = logging.getLogger("flagproxy.control")
BODY_BUFFER = 1 << 16


class ControlExchange:
    def __init__(self, client: ClientConnection, head: RequestHead, exchange: Exchange) -> None:
        self.client = client
        self.head = head
        self.exchange = exchange
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.more = head.has_body
        self.end_delivered = False
        self.gone = False
        self.started = False
        self.complete = False
        self.finished = False
        self.chunked = False
        self.keep = head.keep_alive
        self.head_only = head.method == b"HEAD"
        self._wakeup: asyncio.Event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        server = client.app.settings.server
        self.body_idle = server.body_idle_timeout_s or None
        self.send_idle = server.send_idle_timeout_s or None

    # --- what the client connection calls
    def start(self) -> None:
        head = self.head
        head.scope.update(
            {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": head.version.decode("ascii"),
                "server": self.client.sockname,
                "scheme": "http",
                "root_path": "",
                "raw_path": head.raw_path,
            }
        )
        self.task = asyncio.get_running_loop().create_task(self.run())
        tasks = self.client.server_state.tasks
        tasks.add(self.task)
        self.task.add_done_callback(tasks.discard)

    def request_body(self, chunk: bytes) -> None:
        self.body.append(chunk)
        self.body_bytes += len(chunk)
        if self.body_bytes > BODY_BUFFER:
            self.client.pause_reading("control")
        self._wakeup.set()

    def request_end(self) -> None:
        self.more = False
        self._wakeup.set()

    def client_paused(self, paused: bool) -> None:
        pass  # ``send`` waits on the connection's drain

    def client_lost(self) -> None:
        self.gone = True
        self.exchange.client_gone = True
        self._wakeup.set()
        if self.task is None:  # queued behind another request, never started
            self._done(False)

    def shutdown(self) -> None:
        pass  # uvicorn cancels the task when the grace period ends

    def upgrading(self) -> bool:
        """An Upgrade request to the control plane is answered as a plain request; bytes after its
        head are dropped and the connection closes after the answer."""
        self.keep = False
        self.more = False
        self._wakeup.set()
        return True

    def client_tunnel_data(self, data: bytes) -> None:
        pass

    def client_tunnel_eof(self) -> None:
        pass

    # --- the ASGI cycle
    async def receive(self) -> Message:
        while True:
            if self.gone:
                return {"type": "http.disconnect"}
            if self.body:
                chunk = b"".join(self.body)
                self.body.clear()
                self.body_bytes = 0
                self.client.resume_reading("control")
                return {"type": "http.request", "body": chunk, "more_body": self.more}
            if not self.more and not self.end_delivered:
                self.end_delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self._wakeup.clear()
            if not self.more:
                await self._wakeup.wait()
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.body_idle)
            except TimeoutError:
                self._stalled()

    async def send(self, message: Message) -> None:
        if self.gone or self.complete:
            return
        kind = message["type"]
        client = self.client
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status: int = message["status"]
            lines = []
            has_length = False
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-length":
                    has_length = True
                lines.append(bytes(name) + b": " + bytes(value) + b"\r\n")
            if self.more:
                self.keep = False  # an unread request body follows
            if client.closing:
                self.keep = False
            no_body = self.head_only or status in (204, 304) or status < 200
            if not has_length and not no_body:
                if self.head.version == b"1.1":
                    self.chunked = True
                    lines.append(b"transfer-encoding: chunked\r\n")
                else:
                    self.keep = False
            if not self.keep:
                lines.append(b"connection: close\r\n")
            elif self.head.version == b"1.0":
                lines.append(b"connection: keep-alive\r\n")
            reason = message.get("reason", b"") or _reason(status)
            client.write(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, b"".join(lines)))
            self.exchange.response_started = True
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            body: bytes = message.get("body", b"")
            if body and not self.head_only:
                client.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)
            if not message.get("more_body", False):
                if self.chunked:
                    client.write(b"0\r\n\r\n")
                self.complete = True
                self._done(self.keep)
                return
            if not client.writing_paused():
                return  # the usual case: no waiting, no timer
            try:
                await asyncio.wait_for(client.drain(), self.send_idle)
            except TimeoutError:
                log.info(
                    "control-plane client stopped reading for %g s (send_idle_timeout_s): cut", self.send_idle
                )
                self.gone = True
                self.exchange.client_gone = True
                client.abort()

    async def run(self) -> None:
        try:
            await self.client.app.control_exchange(self.head.scope, self.receive, self.send, self.exchange)
        except asyncio.CancelledError:
            if not self.started and not self.gone:
                detail = "the proxy is shutting down"
                self.client.write(
                    error_response_bytes(503, "shutting_down", detail, self.exchange.request_id)
                )
                self.exchange.status = 503
            self.keep = False
            self.complete = True
            self._done(False)
            raise
        except Exception:
            log.exception("control-plane request failed", extra={"request_id": self.exchange.request_id})
            if not self.started and not self.gone:
                body = error_response_bytes(
                    500, "internal_error", "the control plane failed", self.exchange.request_id
                )
                self.client.write(body)
                self.exchange.status = 500
            self.keep = False
        if not self.complete:
            if self.started and not self.gone:
                self.client.abort()  # the app returned before finishing its response
            self.complete = True
            self._done(False)

    def _stalled(self) -> None:
        """The request body went quiet for ``body_idle_timeout_s``: 408 (or a cut, once answering)."""
        if not self.started:
            detail = f"the request body stalled for {self.body_idle:g} s (body_idle_timeout_s)"
            self.client.write(error_response_bytes(408, "body_timeout", detail, self.exchange.request_id))
            self.exchange.status = 408
            self.started = self.complete = True
            self._done(False)
            self.client.close()
        else:
            self.client.abort()
        self.gone = True
        self.exchange.client_gone = True

    def _done(self, keep: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.client.exchange_done(self, keep)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
