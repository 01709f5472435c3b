"""The ASGI application: control plane under the reserved prefix, everything else forwarded."""

from __future__ import annotations

import logging
import time
from typing import Any

from proxy.admin import build_control_app
from proxy.alerts import Alerter
from proxy.budget_watch import BudgetWatch
from proxy.config import Settings, StoreSettings
from proxy.context import ContextBuilder
from proxy.forward import Forwarder, Receive, Send, request_id_for
from proxy.header import FlagHeaders
from proxy.metrics import Metrics, forget_dead_workers, process_exiting
from proxy.resolver import FlagResolver
from proxy.sources.split_sync import SplitSync
from proxy.store import FlagStore, MemoryStore, initial_state
from proxy.store.base import Snapshot
from proxy.store.state import RawState

log = logging.getLogger("flagproxy")
access_log = logging.getLogger("flagproxy.access")


def build_store(settings: Settings, metrics: Metrics | None = None) -> FlagStore:
    """Redis when configured, else the embedded memory store; both start from the flags file."""
    path = settings.store.flags_file
    required = path != StoreSettings.flags_file  # the default seeds may be absent; an explicit file not

    def from_file() -> RawState:
        return initial_state(path, required)

    seed = from_file()  # validated now: a bad flags file stops startup with a clear message
    if settings.store.redis_url:
        from proxy.store.redis import RedisStore  # the Redis client is imported only when it is used

        return RedisStore(settings.store, fallback=from_file, metrics=metrics)
    if metrics is not None:
        metrics.synced("file")
    return MemoryStore(seed, audit_max=settings.store.audit_max)


def with_request_id(send: Send, request_id: str) -> Send:
    """``send`` adding ``X-Request-Id`` to the response (control-plane answers carry it too)."""
    header = (b"x-request-id", request_id.encode("ascii"))

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return sending


class FlagProxy:
    def __init__(self, settings: Settings, store: FlagStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store: FlagStore = store or build_store(settings, self.metrics)
        self.flag_headers = FlagHeaders(settings.header.name, settings.header.config_name)
        context = ContextBuilder(settings.context, bucketing_key_header=settings.split.bucketing_key_header)
        self.resolver = FlagResolver(self.store, self.flag_headers, context)
        self.split = SplitSync(settings.split, self.store, metrics=self.metrics)
        self.alerter = Alerter(settings.alerts, metrics=self.metrics)
        self.budget = BudgetWatch(settings, self.alerter, self.flag_headers)
        self.store.on_change(self.budget.preflight)
        self.store.on_change(self._snapshot_metrics)
        self._snapshot_metrics(self.store.snapshot)
        self.forwarder = Forwarder(settings, self.resolver, self.budget, self.metrics)
        self.control = build_control_app(self)
        self.control_prefix = settings.server.control_prefix
        self.control_prefix_slash = self.control_prefix + "/"
        self.access_log = settings.log.access_log

    def _snapshot_metrics(self, snapshot: Snapshot) -> None:
        self.metrics.snapshot_installed(snapshot.version, len(snapshot.flags), snapshot.raw.source_versions)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.access_log:
                await self.logged(scope, receive, send)
            else:
                await self.dispatch(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    async def dispatch(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(self.control_prefix_slash) or path == self.control_prefix:
            await self.control(scope, receive, with_request_id(send, request_id_for(scope)))
        else:
            await self.forwarder(scope, receive, send)

    async def logged(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """``dispatch`` with one access-log event per request ([log] access_log)."""
        started = time.perf_counter()
        status = 0
        sent = 0

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.dispatch(scope, receive, watch)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            status = status or 499  # the client went away before a response started
            method, path = scope["method"], scope["path"]
            client = scope.get("client")
            access_log.info(
                "%s %s %d %.1fms",
                method,
                path,
                status,
                duration_ms,
                extra={
                    "event": "request",
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                    "bytes_sent": sent,
                    "client": client[0] if client else None,
                    "origin": scope.get("flagproxy.origin"),
                    "request_id": scope.get("flagproxy.request_id"),
                },
            )

    async def startup(self) -> None:
        forget_dead_workers()
        await self.alerter.start()
        await self.store.start()
        await self.forwarder.start()
        await self.split.start()
        self.budget.preflight(self.store.snapshot)
        log.info(
            "flagproxy ready: %d flags (store version %d), origins: %s",
            len(self.store.snapshot.flags),
            self.store.snapshot.version,
            ", ".join(f"{o.prefix}={o.url}" for o in self.settings.origins) or "none",
        )

    async def shutdown(self) -> None:
        await self.split.close()
        await self.forwarder.close()
        await self.store.close()
        await self.alerter.close()
        process_exiting()

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
