"""``ClientAPI``: the client flags API's state, shared by its handlers (keys, views, limits, streams)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.config import Settings
from proxy.control.clients.keys import ClientKey, KeyRing, presented_key
from proxy.control.clients.rate_limit import RateLimiter
from proxy.control.clients.responses import JSON, header, ofrep_error, plain_error, respond
from proxy.control.clients.stream_hub import StreamHub
from proxy.control.clients.views import View, Views
from proxy.engine import Flag, Served, variant_name
from proxy.metrics import Metrics
from proxy.store.base import FlagStore

if TYPE_CHECKING:
    from proxy.asgi import Scope, Send
    from proxy.experiments.analytics import Analytics
    from proxy.experiments.recorder import Recorder
    from proxy.lifecycle.usage import UsageCounter

log = logging.getLogger("flagproxy.clients")
HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
USAGE_SAMPLE_S = 0.01  # answers counted for the lifecycle's usage: as proxied requests, one per 10 ms
OVER_BUDGET_REMEMBERED = 10_000  # (key, flag set) pairs already logged as over the payload budget


class ClientAPI:
    def __init__(
        self,
        settings: Settings,
        store: FlagStore,
        metrics: Metrics,
        recorder: Recorder | None = None,
        analytics: Mapping[str, Analytics] | None = None,
        usage: UsageCounter | None = None,
    ) -> None:
        self.settings = settings.client_api
        self.prefix = settings.server.control_prefix
        self.store = store
        self.metrics = metrics
        self.recorder = recorder
        self.analytics = analytics or {}
        self.usage = usage  # the lifecycle's "last evaluated" and outcomes (potentially stale flags)
        self._next_usage = float("-inf")
        self.ring = KeyRing(settings.client_keys)
        self.views = Views()
        self.limiter = RateLimiter(self.settings.rate_limit_per_s, self.settings.rate_limit_burst)
        self.hub = StreamHub(store, self.settings.max_streams, metrics)
        self._over_budget: set[tuple[str, tuple[str, ...]]] = set()
        self._stream_uris: dict[str, tuple[int, str]] = {}  # key name → (expiry, uri): one HMAC per step

    def reconfigure(self, settings: Settings) -> None:
        """New keys or [client_api] settings (a reload). Every live-update stream ends, so that a
        removed key's streams stop and the rest reconnect under the new keys."""
        self.settings = settings.client_api
        self.ring = KeyRing(settings.client_keys)
        self.views = Views()
        self.limiter = RateLimiter(self.settings.rate_limit_per_s, self.settings.rate_limit_burst)
        self.hub.max_streams = self.settings.max_streams
        self._over_budget = set()
        self._stream_uris = {}
        self.hub.end_streams()

    @property
    def enabled(self) -> bool:
        return bool(self.ring)

    def view(self, key: ClientKey) -> View:
        return self.views.of(self.store.snapshot, key)

    async def admit(self, scope: Scope, send: Send, endpoint: str, ofrep: bool) -> ClientKey | None:
        """The request's client key, or None once a 401 or 429 has been sent."""
        key = self.ring.find(presented_key(header(scope, b"authorization"), header(scope, b"x-api-key")))
        if key is None:
            await self.refuse(
                send, endpoint, "none", 401, "unauthorized", "a valid client key is required", ofrep
            )
            return None
        return key if await self.within_rate(send, endpoint, key, ofrep) else None

    async def within_rate(self, send: Send, endpoint: str, key: ClientKey, ofrep: bool) -> bool:
        wait = self.limiter.retry_after(key.name)
        if not wait:
            return True
        detail = f"more than {self.settings.rate_limit_per_s:g} requests per second for this key"
        await self.refuse(send, endpoint, key.name, 429, "rate_limited", detail, ofrep, retry_after=wait)
        return False

    async def refuse(
        self,
        send: Send,
        endpoint: str,
        key_name: str,
        status: int,
        error: str,
        detail: str,
        ofrep: bool,
        retry_after: int = 0,
    ) -> None:
        body = ofrep_error("GENERAL", detail) if ofrep else plain_error(error, detail)
        headers = [JSON]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if retry_after:
            headers.append((b"retry-after", str(retry_after).encode()))
        self.metrics.client_request(endpoint, status, key_name)
        await respond(send, status, body, headers)

    def expose(self, flag: Flag, served: Served, context: Mapping[str, Any], now: float) -> None:
        """A value given to the unit ``context["key"]``: an exposure when the flag is an experiment's
        (or its source's analytics', as for Split), exactly as when it reaches the origin."""
        unit = context.get("key")
        if unit.__class__ is not str or not unit:
            return
        if flag.experiment is not None:
            if flag.experimenting and self.recorder is not None:
                self.recorder.exposed(flag.key, variant_name(served.value), unit, now)
        elif self.analytics:
            sink = self.analytics.get(flag.source)
            if sink is not None:
                sink.exposed(flag, served, context, int(now * 1000))

    def usage_due(self, now: float) -> list[tuple[Flag, Served]] | None:
        """A list to collect this answer's flags in when it is sampled for the usage counters (at most
        one answer every ``USAGE_SAMPLE_S``, as proxied requests are), else None."""
        if self.usage is None or now < self._next_usage:
            return None
        self._next_usage = now + USAGE_SAMPLE_S
        return []

    def counted(self, used: list[tuple[Flag, Served]] | None, now: float) -> None:
        if used and self.usage is not None:
            self.usage.seen_all(used, now)

    def over_budget(self, key: ClientKey, flags: tuple[str, ...], size: int) -> None:
        """A compact response above ``max_payload_bytes``: counted each time, logged once per key and
        flag set."""
        self.metrics.client_over_budget.labels(key.name).inc()
        seen = (key.name, flags)
        if seen in self._over_budget or len(self._over_budget) >= OVER_BUDGET_REMEMBERED:
            return
        self._over_budget.add(seen)
        log.warning(
            "client flags response of %d bytes for key %s is over [client_api] max_payload_bytes (%d); "
            "flags: %s",
            size,
            key.name,
            self.settings.max_payload_bytes,
            ",".join(flags) if len(flags) <= 50 else f"{len(flags)} flags",
        )

    def stream_origin(self, scope: Scope) -> str | None:
        """Where browsers reach the stream: ``[client_api] public_url``, else ``http://<Host>`` (the
        host and port the client itself used; a malformed Host advertises no stream)."""
        if self.settings.public_url:
            return self.settings.public_url
        host = header(scope, b"host")
        return f"http://{host}" if host and HOST.fullmatch(host) else None

    def stream_request_uri(self, key: ClientKey, now: float | None = None) -> str:
        """The stream's path with a token; the token changes every half TTL (so the bulk body, and
        its ETag, stay the same in between) and is good for between half the TTL and the TTL."""
        ttl = self.settings.stream_token_ttl_s
        step = max(1, ttl // 2)
        now = time.time() if now is None else now
        expiry = (int(now) // step + 2) * step
        known = self._stream_uris.get(key.name)
        if known is not None and known[0] == expiry:
            return known[1]
        uri = f"{self.prefix}/client/v1/stream?token={self.ring.mint(key, expiry)}"
        self._stream_uris[key.name] = (expiry, uri)
        return uri
