"""``GET <prefix>/console/events``: the console's live updates, as Server-Sent Events.

The client flags API's stream (``proxy.control.clients.stream``) serves it, with one key that sees
every flag: one ``refetchEvaluation`` event per store change (coalesced while the page is not
reading), heartbeats, the per-worker stream limit, and the end of every stream on shutdown. The page
then fetches its own view again and swaps it in; it closes the stream on ``pagehide``.
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request

from proxy.asgi import Receive, Scope, Send
from proxy.control.clients.keys import ClientKey
from proxy.control.clients.stream import FlagStream
from proxy.control.console import session
from proxy.control.deps import deps_of
from proxy.control.problems import problem_response

# counted as the client API's streams are (flagproxy_client_streams), under the key name "console"
CONSOLE = ClientKey(name="console", secret=b"", digest=hashlib.sha256(b"").digest(), globs=("*",))


class Events:
    """An ASGI app (not a request-response endpoint): the stream writes as changes come."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await events(scope, receive, send)


async def events(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    deps = deps_of(request)
    if session.verify(deps.settings, request.cookies.get(session.COOKIE, "")) is None:
        await problem_response(401, "unauthorized", "sign in to the console first")(scope, receive, send)
        return
    if deps.clients is None:
        detail = "live updates are not served here: reload the page to see changes"
        await problem_response(404, "not_found", detail)(scope, receive, send)
        return
    await FlagStream(deps.clients).serve(receive, send, CONSOLE)
