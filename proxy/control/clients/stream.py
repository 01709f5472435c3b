"""``GET {prefix}/client/v1/stream``: live updates as Server-Sent Events (OFREP's event stream).

Authenticated by the key header or by ``?token=`` (what bulk OFREP responses advertise: browsers'
``EventSource`` sends no headers). On a store change touching a flag the key sees, one event::

    event: message
    data: {"type": "refetchEvaluation", "etag": "\"v<store version>\""}

and a comment line every ``heartbeat_s`` while idle. A stream holds one pending beacon at most
(``stream_hub.Subscriber``): a client that does not read makes the writer wait on the connection's
flow control, and nothing piles up; one that stops reading for ``[server] send_idle_timeout_s`` is
cut. At most ``max_streams`` per worker (503 beyond); on shutdown every stream ends its response at
once, and a stream whose client is not reading is cut there and then (it would hold the shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.asgi import Receive, Scope, Send
from proxy.control.clients.keys import ClientKey
from proxy.control.clients.responses import JSON, dumps, plain_error, query, respond
from proxy.control.clients.service import ClientAPI
from proxy.control.clients.stream_hub import Subscriber

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx in front: pass events on as they come
]
OPENING = b"retry: 2000\n: connected\n\n"
HEARTBEAT = b": heartbeat\n\n"


def event(etag: str) -> bytes:
    return b"event: message\ndata: " + dumps({"type": "refetchEvaluation", "etag": etag}) + b"\n\n"


class FlagStream:
    endpoint = "stream"

    def __init__(self, api: ClientAPI) -> None:
        self.api = api

    async def key(self, scope: Scope, send: Send) -> ClientKey | None:
        api = self.api
        token = next((value for name, value in query(scope) if name == "token"), None)
        if token is None:
            return await api.admit(scope, send, self.endpoint, ofrep=False)
        key = api.ring.redeem(token)
        if key is None:
            detail = "the stream token is not valid or has expired: fetch the flags again for a new one"
            await api.refuse(send, self.endpoint, "none", 401, "unauthorized", detail, ofrep=False)
            return None
        return key if await api.within_rate(send, self.endpoint, key, ofrep=False) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = await self.key(scope, send)
        if key is None:
            return
        await self.serve(receive, send, key)

    async def serve(self, receive: Receive, send: Send, key: ClientKey) -> None:
        """The stream for ``key``, already authenticated (the console's live updates use it too)."""
        api = self.api
        hub = api.hub
        if hub.full or hub.closing:
            detail = f"this worker holds {hub.max_streams} streams ([client_api] max_streams)"
            api.metrics.client_request(self.endpoint, 503, key.name)
            await respond(send, 503, plain_error("too_many_streams", detail), [JSON])
            return
        subscriber = hub.subscribe(key)
        watcher = asyncio.get_running_loop().create_task(_watch(receive, subscriber))
        api.metrics.client_request(self.endpoint, 200, key.name)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": OPENING, "more_body": True})
            await self.relay(subscriber, send)
            if not subscriber.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except StreamCut:
            pass  # the response stays unfinished: the connection is cut
        finally:
            hub.unsubscribe(subscriber)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def relay(self, subscriber: Subscriber, send: Send) -> None:
        loop = asyncio.get_running_loop()
        heartbeat_s = self.api.settings.heartbeat_s
        beat = [False]

        def due() -> None:
            beat[0] = True
            subscriber.wake.set()

        timer = loop.call_later(heartbeat_s, due)
        try:
            while True:
                await subscriber.wake.wait()
                subscriber.wake.clear()
                if subscriber.gone or subscriber.closing:
                    return
                if subscriber.pending:
                    subscriber.pending = False
                    chunk = event(subscriber.etag)
                elif beat[0]:
                    chunk = HEARTBEAT
                else:
                    continue
                beat[0] = False
                timer.cancel()
                timer = loop.call_later(heartbeat_s, due)
                await write(subscriber, send, chunk)
        finally:
            timer.cancel()


class StreamCut(Exception):
    """Shutting down while the client is not reading: the stream is cut, not ended."""


async def write(subscriber: Subscriber, send: Send, chunk: bytes) -> None:
    """One chunk, unless shutdown comes first while the client is not reading (``StreamCut``)."""
    sending = asyncio.ensure_future(send({"type": "http.response.body", "body": chunk, "more_body": True}))
    if not sending.done():
        await asyncio.wait({sending, subscriber.shut}, return_when=asyncio.FIRST_COMPLETED)
    if not sending.done():
        sending.cancel()
        raise StreamCut
    sending.result()


async def _watch(receive: Receive, subscriber: Subscriber) -> None:
    """Reads the (empty) request to its end, then waits for the client to go."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.gone = True
    subscriber.wake.set()
