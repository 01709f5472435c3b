"""The composition root: builds every part from the settings and wires the data flow

    sources → store → engine → dataplane → observers        (control plane beside it)

It is the only module that imports all of them. Requests enter in ``FlagProxy.__call__``: each gets
one ``Exchange``; control-plane paths go to Starlette, everything else to the ``Forwarder``; when the
request is over the exchange goes to the observers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.alerts import Alerter
from proxy.asgi import Message, Receive, Scope, Send
from proxy.config import ConfigError, Settings, StoreSettings, flag_header_names
from proxy.control.app import build_control_app
from proxy.control.chat.runtime import ChatRuntime
from proxy.control.clients import ClientAPI
from proxy.control.deps import ControlDeps
from proxy.dataplane.context import ContextBuilder
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.forward import Forwarder, ProxyExchange
from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.messages import RequestHead
from proxy.dataplane.resolver import FlagResolver
from proxy.errors import send_error
from proxy.experiments.analytics import Analytics
from proxy.experiments.backend import open_backend
from proxy.experiments.goals import Goals
from proxy.experiments.recorder import Recorder
from proxy.lifecycle.notify import Notifiers
from proxy.lifecycle.service import Lifecycle
from proxy.logs import set_level, without_credentials
from proxy.metrics import Metrics, forget_dead_workers, process_exiting
from proxy.observers.access_log import AccessLog
from proxy.observers.base import Observer, Observers
from proxy.observers.budget_alerts import BudgetWatch
from proxy.observers.exposures import ExposureObserver
from proxy.observers.origin_metrics import OriginMetricsObserver
from proxy.observers.usage import UsageObserver
from proxy.reload import early_sighup
from proxy.sources.base import Sync, SyncContext, analytics_of, webhook_endpoints_of
from proxy.sources.native.document import initial_state
from proxy.sources.registry import DEFAULT, Registry, UnknownSource
from proxy.store import FlagStore, MemoryStore
from proxy.store.base import Snapshot
from proxy.store.state import RawState

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from proxy.dataplane.client_side import ClientConnection

log = logging.getLogger("flagproxy")


def build_store(settings: Settings, registry: Registry, metrics: Metrics | None = None) -> FlagStore:
    """Redis when configured, else the embedded memory store; both start from the flags file."""
    path = settings.store.flags_file
    required = path != StoreSettings.flags_file  # the default seeds may be absent; an explicit file not

    def from_file() -> RawState:
        return initial_state(path, required)

    seed = from_file()  # validated now: a bad flags file stops startup with a clear message
    if settings.store.uses_redis:
        from proxy.store.redis import RedisStore  # the Redis client is imported only when it is used

        return RedisStore(settings.store, fallback=from_file, metrics=metrics, compiler=registry)
    if metrics is not None:
        metrics.synced("file")
    return MemoryStore(seed, audit_max=settings.store.audit_max, compiler=registry)


def compile_goals(settings: Settings) -> Goals:
    try:
        return Goals(settings.goals)
    except ValueError as exc:  # a glob too large for RE2
        raise ConfigError(f"[[goals]] path: {exc}") from None


def with_request_id(send: Send, request_id: str, exchange: Exchange) -> Send:
    """``send`` adding ``X-Request-Id`` to the response, noting status and bytes in the exchange."""
    header = (b"x-request-id", request_id.encode("ascii"))

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            exchange.status = message["status"]
            exchange.response_started = True
            message = {**message, "headers": [*message.get("headers", ()), header]}
        else:
            exchange.bytes_sent += len(message.get("body", b""))
        await send(message)

    return sending


class HeapFreezer:
    """Move what is alive now — the compiled snapshot above all — out of the collector's sight.

    The garbage collector otherwise walks every compiled flag on each full collection, and those
    come often under load (every request allocates). Called when a snapshot is installed. Freezing
    costs nothing; collecting first would walk the whole new snapshot on the event loop (about
    0.2 s for 5,000 flags). Frozen objects are still freed when their last reference goes (an old
    snapshot holds no cycles), so only cyclic garbage could pile up in the frozen set: when it has
    grown by half since the last full collection, the next call unfreezes and collects everything.
    """

    GROWTH = 1.5

    def __init__(self) -> None:
        self.after_collect = 0  # frozen objects right after the last full collection

    def __call__(self, _snapshot: object = None) -> None:
        if self.after_collect and gc.get_freeze_count() <= self.after_collect * self.GROWTH:
            gc.freeze()
            return
        self.collect()

    def collect(self) -> None:
        """The full pass: at startup, and when the frozen set keeps growing."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.after_collect = gc.get_freeze_count()


freeze_heap = HeapFreezer()


class FlagProxy:
    def __init__(
        self,
        settings: Settings,
        store: FlagStore | None = None,
        registry: Registry | None = None,
        observers: list[Observer] | None = None,
    ) -> None:
        self.settings = settings
        try:
            self.registry = (registry or DEFAULT).ordered(settings.store.sources)
        except UnknownSource as exc:
            raise ConfigError(f"[store] sources: {exc}") from None
        self.metrics = Metrics()
        self.store: FlagStore = store or build_store(settings, self.registry, self.metrics)
        self.flag_headers = FlagHeaders(flag_header_names(settings))
        # Split's [split] bucketing_key_header: the one source setting the request context reads
        split = settings.section("split")
        bucketing_header = getattr(split, "bucketing_key_header", "") if split is not None else ""
        context = ContextBuilder(
            settings.context,
            bucketing_key_header=bucketing_header,
            trusted_proxies=settings.proxy.trusted_proxies,
        )
        self.resolver = FlagResolver(self.store, context)
        self.forwarder = Forwarder(settings, self.resolver, self.flag_headers)
        self.syncs: dict[str, Sync] = {}
        self.analytics: dict[str, Analytics] = {}  # sources' own exposure destinations (Split)
        for source in self.registry.sources:
            source_context = SyncContext(settings, settings.section(source.name), self.store, self.metrics)
            sync = source.sync(source_context)
            if sync is not None:
                self.syncs[source.name] = sync
            sink = analytics_of(source, source_context) if settings.experiments.enabled else None
            if sink is not None:
                self.analytics[source.name] = sink
        self.recorder = self._recorder(settings)
        self.alerter = Alerter(settings.alerts, metrics=self.metrics)
        self.budget = BudgetWatch(settings, self.alerter, self.flag_headers)
        # change notices and the stale digest; the chat integration registers "telegram" here
        self.notifiers = Notifiers(self.alerter)
        self.lifecycle = Lifecycle(settings, self.store, self.notifiers)
        self.store.on_change(self.budget.preflight)
        self.store.on_change(self._snapshot_metrics)
        self.store.on_change(freeze_heap)  # the process's one heap: one freezer for every app
        self._snapshot_metrics(self.store.snapshot)

        chain: list[Observer] = [
            OriginMetricsObserver(self.metrics, [o.label for o in self.forwarder.router.origins]),
            self.budget,
            UsageObserver(self.lifecycle.counter),
        ]
        recorder = self.recorder
        self.goals = compile_goals(settings)
        self.exposures: ExposureObserver | None = None
        if recorder is not None:
            self.store.on_change(lambda snapshot: recorder.use_flags(snapshot.flags, self.goals.names))
            recorder.use_flags(self.store.snapshot.flags, self.goals.names)
            self.exposures = ExposureObserver(recorder, self.goals, self.analytics)
            chain.append(self.exposures)
        if settings.log.access_log:
            chain.append(AccessLog())
        chain.extend(observers or ())
        self.observers = Observers(
            chain, on_error=self.metrics.observer_failed, on_drop=self.metrics.observer_dropped
        )

        self.clients = ClientAPI(
            settings, self.store, self.metrics, self.recorder, self.analytics, self.lifecycle.counter
        )
        self.chat = ChatRuntime(settings.chat, settings.alerts.change_channel)
        self.notifiers.register("telegram", self.chat.telegram_notifier)  # telegram:<chat id> channels
        self.control = self._control_app(settings)
        self.control_prefix = settings.server.control_prefix
        self.control_prefix_slash = self.control_prefix + "/"
        self.settings_source: Callable[[], Settings] | None = None  # how SIGHUP reads them again
        self._reloading: asyncio.Task[None] | None = None
        self._reload_wanted = False

    def _control_app(self, settings: Settings) -> Starlette:
        deps = ControlDeps(
            settings=settings,
            store=self.store,
            metrics=self.metrics,
            router=self.forwarder.router,
            flag_headers=self.flag_headers,
            precedence=self.registry.precedence,
            syncs=self.syncs,
            recorder=self.recorder,
            analytics=self.analytics,
            chat=self.chat,
            lifecycle=self.lifecycle,
            clients=self.clients,
        )
        webhooks = [route for source in self.registry.sources for route in source.webhook_routes()]
        described = [e for source in self.registry.sources for e in webhook_endpoints_of(source, settings)]
        return build_control_app(deps, webhooks, described)

    async def reconfigure(self, settings: Settings) -> None:
        """Take ``settings`` (validated; restart-only parts as they were, ``proxy.reload``).

        Each part is built first and swapped in after, so that nothing is half-changed when one
        of them refuses: requests that began keep what they started with.
        """
        goals = compile_goals(settings)
        forwarder = Forwarder(settings, self.resolver, self.flag_headers)
        await forwarder.start()
        old_forwarder, self.forwarder = self.forwarder, forwarder
        before, self.settings = self.settings, settings
        self.budget.reconfigure(settings)
        self.alerter.settings = settings.alerts
        self.goals = goals
        if self.exposures is not None:
            self.exposures.goals = goals
            self.exposures.recorder.use_flags(self.store.snapshot.flags, goals.names)
        if (settings.client_keys, settings.client_api) != (before.client_keys, before.client_api):
            self.clients.reconfigure(settings)  # ends the live-update streams: only when keys changed
        self.control = self._control_app(settings)
        set_level(settings.log.level)
        await old_forwarder.close()  # idle connections now; busy ones close when their exchange ends
        self.budget.preflight(self.store.snapshot)

    def _recorder(self, settings: Settings) -> Recorder | None:
        e = settings.experiments
        if not e.enabled:
            return None
        return Recorder(
            open_backend(settings),
            self.metrics,
            queue_size=e.queue_size,
            batch_size=e.batch_size,
            flush_interval_s=e.flush_interval_s,
            dedupe_size=e.dedupe_size,
        )

    def _snapshot_metrics(self, snapshot: Snapshot) -> None:
        self.metrics.snapshot_installed(
            snapshot.version, len(snapshot.flags), snapshot.raw.source_versions, snapshot.invalid
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI side uvicorn sees: the lifespan. Requests arrive through the connection protocol
        (``proxy.dataplane.client_side.ClientConnection``), which calls ``proxied`` and
        ``control_exchange``; an ASGI server without it reaches the control plane only."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(self.control_prefix_slash) or path == self.control_prefix:
                await self.control(scope, receive, send)
            else:
                detail = "proxied requests are served by flagproxy's connection protocol (flagproxy serve)"
                await send_error(send, 501, "not_served_here", detail)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    def proxied(self, client: ClientConnection, head: RequestHead, exchange: Exchange) -> ProxyExchange:
        """What serves one proxied request (the connection protocol calls it per request head)."""
        return ProxyExchange(self.forwarder, client, head, exchange)

    async def control_exchange(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        """One control-plane request; the connection hands the exchange to the observers after it."""
        await self.control(scope, receive, with_request_id(send, exchange.request_id, exchange))

    def draining(self) -> None:
        """uvicorn began its graceful shutdown (the connections are told): live-update streams end
        their responses now instead of holding the shutdown for its whole grace period."""
        self.clients.hub.close_all()

    async def startup(self) -> None:
        forget_dead_workers()
        self.observers.start()
        await self.alerter.start()
        await self.store.start()
        await self.forwarder.start()
        for sync in self.syncs.values():
            await sync.start()
        if self.recorder is not None:
            self.recorder.start()
        for sink in self.analytics.values():
            await sink.start()
        self.budget.preflight(self.store.snapshot)
        await self.lifecycle.start()
        freeze_heap.collect()
        self._listen_for_sighup()
        log.info(
            "flagproxy ready: %d flags (store version %d%s), origins: %s",
            len(self.store.snapshot.flags),
            self.store.snapshot.version,
            "" if self.settings.store.uses_redis else f", from {self.settings.store.flags_file}",
            ", ".join(f"{o.prefix}={without_credentials(o.url)}" for o in self.settings.origins) or "none",
        )

    def _listen_for_sighup(self) -> None:
        """SIGHUP reloads (``proxy.reload``) where the process owns its signals: ``flagproxy serve``
        with one worker. Elsewhere (a test's event loop, a worker process) it is not installed."""
        if self.settings_source is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            if early_sighup.is_set():  # one came while the proxy was starting: read again now
                early_sighup.clear()
                self._on_sighup()

    def _on_sighup(self) -> None:
        """A burst of SIGHUPs is one reload, plus one more if any came while it ran."""
        self._reload_wanted = True
        if self._reloading is None or self._reloading.done():
            loop = asyncio.get_running_loop()
            self._reloading = loop.create_task(self._reload_loop(), name="flagproxy-reload")

    async def _reload_loop(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            await self.reload_settings()

    async def reload_settings(self) -> None:
        """Read the settings again (SIGHUP); invalid ones are logged and change nothing."""
        from proxy.reload import reload

        source = self.settings_source
        if source is None:
            return
        log.info("SIGHUP: reading the settings and the flags file again")
        try:
            new = await asyncio.to_thread(source)
        except (ConfigError, OSError) as exc:
            log.error("reload refused, nothing changed: %s", exc)
            return
        try:
            await reload(self, new)
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)

    async def shutdown(self) -> None:
        for sync in self.syncs.values():
            await sync.close()
        await self.forwarder.close()
        await asyncio.to_thread(self.observers.close)  # queued observers may still raise alerts
        for sink in self.analytics.values():
            await sink.close()
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)
        await self.chat.close()  # pending chat replies and announcements, bounded
        await self.lifecycle.close()
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
