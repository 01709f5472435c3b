"""OFREP v0.3.0 (OpenFeature Remote Evaluation Protocol) under the control prefix:

    POST {prefix}/ofrep/v1/evaluate/flags/{key}   one flag      → 200 evaluation, 404, 400
    POST {prefix}/ofrep/v1/evaluate/flags         every flag    → 200 {"flags": [...], "eventStreams"}, 304

Without a ``targetingKey`` the flags are still evaluated (rules on attributes work); a flag that
needed the unit to bucket answers ``TARGETING_KEY_MISSING`` (400 for one flag, a failure item in
bulk), so the application falls back to its code default. The bulk body's strong ETag is a hash of
the body; ``If-None-Match`` naming it → 304.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.asgi import Receive, Scope, Send
from proxy.control.clients.context import ContextError, ofrep_context
from proxy.control.clients.responses import (
    JSON,
    BodyTooLarge,
    dumps,
    etag_matches,
    header,
    ofrep_error,
    read_body,
    respond,
    strong_etag,
)
from proxy.control.clients.service import ClientAPI
from proxy.engine import Context

INACTIVITY_DELAY_S = 120  # OFREP's default: a hidden page closes its stream after this


def needs_unit(has_unit: bool, reason: str, metadata: dict[str, Any]) -> bool:
    """Served the default only because there was no unit to bucket (the engine's ``default``
    reason, or a matching rule's rollout marked ``unbucketed``), or the source refused to evaluate
    without one (``ERROR``)."""
    if has_unit:
        return False
    return reason == "ERROR" or metadata.get("flagReason") == "default" or metadata.get("unbucketed") is True


MISSING = "no targetingKey: this flag buckets on the unit key"


class Evaluation:
    """What both endpoints share: admit the key, read and parse the body."""

    endpoint = ""

    def __init__(self, api: ClientAPI) -> None:
        self.api = api

    async def context(self, scope: Scope, receive: Receive, send: Send) -> tuple[Any, Context, bool] | None:
        api = self.api
        key = await api.admit(scope, send, self.endpoint, ofrep=True)
        if key is None:
            return None
        limit = api.settings.max_body_bytes
        declared = header(scope, b"content-length")
        try:
            if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
                raise BodyTooLarge
            body = await read_body(receive, limit)
        except BodyTooLarge:
            detail = f"the body exceeds [client_api] max_body_bytes ({limit})"
            await self.answer(send, 413, ofrep_error("GENERAL", detail), key.name)
            return None
        try:
            context, has_unit = ofrep_context(body)
        except ContextError as exc:
            flag_key = scope.get("path_params", {}).get("key")
            await self.answer(send, 400, ofrep_error(exc.error_code, exc.detail, flag_key), key.name)
            return None
        return key, context, has_unit

    async def answer(self, send: Send, status: int, body: bytes, key_name: str, *headers: Any) -> None:
        self.api.metrics.client_request(self.endpoint, status, key_name)
        await respond(send, status, body, [JSON, *headers])


class SingleFlag(Evaluation):
    endpoint = "ofrep_single"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = await self.context(scope, receive, send)
        if admitted is None:
            return
        key, context, has_unit = admitted
        flag_key: str = scope["path_params"]["key"]
        view = self.api.view(key)
        flag = view.by_key.get(flag_key)
        if flag is None:
            body = ofrep_error("FLAG_NOT_FOUND", f"flag {flag_key!r} not found", flag_key)
            await self.answer(send, 404, body, key.name)
            return
        served, item, reason, metadata = view.encoded.item(flag, context)  # encoded once per snapshot
        if needs_unit(has_unit, reason, metadata):
            await self.answer(send, 400, ofrep_error("TARGETING_KEY_MISSING", MISSING, flag_key), key.name)
            return
        now = time.time()
        self.api.expose(flag, served, context, now)
        if self.api.usage_due(now) is not None:
            self.api.counted([(flag, served)], now)
        await self.answer(send, 200, item.encode(), key.name)


class BulkFlags(Evaluation):
    endpoint = "ofrep_bulk"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = await self.context(scope, receive, send)
        if admitted is None:
            return
        key, context, has_unit = admitted
        api = self.api
        now = time.time()
        view = api.view(key)
        encoded = view.encoded
        items = []
        used = api.usage_due(now)
        for flag in view.flags:
            served, item, reason, metadata = encoded.item(flag, context)
            if used is not None:
                used.append((flag, served))
            if needs_unit(has_unit, reason, metadata):
                missing = {"key": flag.key, "errorCode": "TARGETING_KEY_MISSING", "errorDetails": MISSING}
                items.append(dumps(missing).decode())
                continue
            api.expose(flag, served, context, now)
            items.append(item)
        api.counted(used, now)
        streams = ""
        origin = api.stream_origin(scope)
        if origin is not None:
            endpoint = {"origin": origin, "requestUri": api.stream_request_uri(key, now)}
            sse = {"type": "sse", "endpoint": endpoint, "inactivityDelaySec": INACTIVITY_DELAY_S}
            streams = ',"eventStreams":' + dumps([sse]).decode()
        # {"flags": [...], "eventStreams": [...]}, from the items encoded once per snapshot
        body = ('{"flags":[' + ",".join(items) + "]" + streams + "}").encode()
        etag = strong_etag(body)
        tag = (b"etag", etag.encode())
        if etag_matches(header(scope, b"if-none-match"), etag):
            api.metrics.client_request(self.endpoint, 304, key.name)
            await respond(send, 304, b"", [tag])
            return
        await self.answer(send, 200, body, key.name, tag)
