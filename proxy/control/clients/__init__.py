"""The client flags API (docs/clients.md): browsers, games and services read their flags.

    /ofrep/v1/evaluate/flags[/]      ofrep.py     OFREP bulk evaluation (ETag, eventStreams)
    /ofrep/v1/evaluate/flags/{key}   ofrep.py     OFREP single-flag evaluation
    /client/v1/flags                 compact.py   the compact GET for games and mobile (gzip, ETag)
    /client/v1/stream                stream.py    live updates (Server-Sent Events)

- ``keys``: client keys (constant-time lookup, flag globs) and stream tokens.
- ``views``: the flags each key sees, once per snapshot.
- ``values``: an engine outcome as value, variant, OpenFeature reason and metadata.
- ``context``: an OFREP body as the engine's context (and its 400s).
- ``stream_hub``: which streams a store change concerns, computed once per change.
- ``cors``, ``rate_limit``, ``responses``: CORS, per-key token buckets, plain ASGI answers.
- ``service``: ``ClientAPI``, the state the handlers share (built by the composition root).

With no ``[[client_keys]]`` every path answers 404, saying the API is off and what turns it on.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route, Router

from proxy.control.clients.compact import CompactFlags
from proxy.control.clients.cors import ClientCors
from proxy.control.clients.ofrep import BulkFlags, SingleFlag
from proxy.control.clients.service import ClientAPI
from proxy.control.clients.stream import FlagStream
from proxy.control.problems import EVERY_METHOD, disabled

__all__ = ["ClientAPI", "client_mounts"]


def client_mounts(api: ClientAPI | None) -> list[BaseRoute]:
    """``/ofrep`` and ``/client`` under the control prefix (404s naming ``[[client_keys]]`` without keys)."""
    if api is None or not api.enabled:
        off = disabled("the client API is disabled: configure [[client_keys]] (docs/clients.md)")
        return [
            Mount(prefix, app=Router([Route("/{rest:path}", off, methods=EVERY_METHOD)]))
            for prefix in ("/ofrep", "/client")
        ]
    bulk = BulkFlags(api)
    ofrep = [
        Route("/v1/evaluate/flags", bulk, methods=["POST"]),
        Route("/v1/evaluate/flags/", bulk, methods=["POST"]),
        Route("/v1/evaluate/flags/{key:path}", SingleFlag(api), methods=["POST"]),
    ]
    client = [
        Route("/v1/flags", CompactFlags(api), methods=["GET"]),
        Route("/v1/stream", FlagStream(api), methods=["GET"]),
    ]
    origins = api.settings.cors_origins
    return [
        Mount("/ofrep", app=ClientCors(Router(ofrep, redirect_slashes=False), origins)),
        Mount("/client", app=ClientCors(Router(client, redirect_slashes=False), origins)),
    ]
