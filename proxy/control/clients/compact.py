"""``GET {prefix}/client/v1/flags?key=<unit>&<attribute>=<value>...&flags=a,b``: one small call.

→ ``{"flags": {key: value}, "variants": {key: variant}}`` (values as in ``values.py``), with a strong
ETag (304 on ``If-None-Match``), ``Cache-Control: private, max-age=<max_age_s>`` and gzip when the
client accepts it. Every query parameter other than ``key`` and ``flags`` is an attribute, as header
attributes are: the values are exactly what the origin would get in its flag header for that unit.
"""

from __future__ import annotations

import gzip
import time
from typing import Any

from proxy.asgi import Receive, Scope, Send
from proxy.control.clients.context import MAX_ATTRIBUTES, MAX_TARGETING_KEY
from proxy.control.clients.responses import (
    JSON,
    etag_matches,
    gzip_etag,
    header,
    plain_error,
    query,
    respond,
    strong_etag,
)
from proxy.control.clients.service import ClientAPI
from proxy.dataplane.context import make_context

VARY = (b"vary", b"Accept-Encoding")


def accepts_gzip(accept_encoding: str) -> bool:
    """``Accept-Encoding`` allows gzip: its own entry's q-value decides, else that of ``*``."""
    gzip_q: float | None = None
    star_q: float | None = None
    for part in accept_encoding.lower().split(","):
        coding, *params = part.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            gzip_q = q
        elif coding == "*":
            star_q = q
    chosen = gzip_q if gzip_q is not None else star_q
    return chosen is not None and chosen > 0


class CompactFlags:
    endpoint = "compact"

    def __init__(self, api: ClientAPI) -> None:
        self.api = api
        self.cache_control = (b"cache-control", b"private, max-age=%d" % api.settings.max_age_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.api
        key = await api.admit(scope, send, self.endpoint, ofrep=False)
        if key is None:
            return
        unit = None
        wanted: list[str] | None = None
        attributes: dict[str, Any] = {}
        for name, value in query(scope):
            if name == "key":
                unit = value or None
            elif name == "flags":
                wanted = [part.strip() for part in value.split(",") if part.strip()] or None  # "": all
            else:
                attributes[name] = value
        if len(attributes) > MAX_ATTRIBUTES or (unit is not None and len(unit) > MAX_TARGETING_KEY):
            detail = f"at most {MAX_ATTRIBUTES} attributes and a key of {MAX_TARGETING_KEY} characters"
            api.metrics.client_request(self.endpoint, 400, key.name)
            await respond(send, 400, plain_error("bad_context", detail), [JSON])
            return
        context = make_context(unit, attributes)
        view = api.view(key)
        if wanted is None:
            flags = view.flags
        else:
            by_key = view.by_key
            flags = tuple(by_key[k] for k in sorted(set(wanted)) if k in by_key)
        now = time.time()
        encoded = view.encoded
        values: list[str] = []
        variants: list[str] = []
        used = api.usage_due(now)
        for flag in flags:
            served = flag.evaluate(context)
            if used is not None:
                used.append((flag, served))
            value, variant = encoded.entry(flag, served)
            values.append(value)
            variants.append(variant)
            api.expose(flag, served, context, now)
        api.counted(used, now)
        # {"flags": {key: value}, "variants": {key: variant}}, from entries encoded once per snapshot
        body = ('{"flags":{' + ",".join(values) + '},"variants":{' + ",".join(variants) + "}}").encode()
        etag = strong_etag(body)
        zipped = accepts_gzip(header(scope, b"accept-encoding"))
        if zipped:
            etag = gzip_etag(etag)
        headers = [self.cache_control, VARY, (b"etag", etag.encode())]
        if etag_matches(header(scope, b"if-none-match"), etag):
            api.metrics.client_request(self.endpoint, 304, key.name)
            await respond(send, 304, b"", headers)
            return
        if len(body) > api.settings.max_payload_bytes:  # a body sent (not a 304) over the budget
            api.over_budget(key, tuple(flag.key for flag in flags), len(body))
        if zipped:
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers.append((b"content-encoding", b"gzip"))
        api.metrics.client_request(self.endpoint, 200, key.name)
        await respond(send, 200, body, [JSON, *headers])
