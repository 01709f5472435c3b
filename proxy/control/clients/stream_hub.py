"""Which live-update streams a store change concerns, decided once per change (not per stream).

Each stream is a ``Subscriber`` with one pending flag, not a queue: every event is the same "refetch"
beacon, so notifications that arrive while a client is not reading coalesce into one. A change
touches a flag when it was added or removed, or its compiled flag is a new one (its definition,
or what it depends on, changed), or its kill/promotion changed (a killed or promoted flag is
built anew on every change: it counts as touched only when its outcomes changed). The touched
keys are computed once by comparing the previous snapshot with the new one; then each distinct
glob set with streams is checked against those keys only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from fnmatch import fnmatchcase

from proxy.control.clients.keys import ClientKey
from proxy.metrics import Metrics
from proxy.store.base import FlagStore, Snapshot
from proxy.store.state import OVERRIDES


class Subscriber:
    __slots__ = ("closing", "etag", "gone", "key", "pending", "shut", "wake")

    def __init__(self, key: ClientKey, etag: str) -> None:
        self.key = key
        self.wake = asyncio.Event()
        self.pending = False  # a refetch beacon not yet written: at most one, however many changes
        self.etag = etag
        self.gone = False  # the client disconnected
        self.closing = False  # the server is shutting down
        self.shut: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set with closing

    def notify(self, etag: str) -> None:
        self.pending = True
        self.etag = etag
        self.wake.set()


def config_etag(snapshot: Snapshot) -> str:
    """The ``etag`` of a refetch event: the store version of the flags it announces."""
    return f'"v{snapshot.version}"'


class StreamHub:
    def __init__(self, store: FlagStore, max_streams: int, metrics: Metrics) -> None:
        self.max_streams = max_streams
        self.metrics = metrics
        self.by_globs: dict[tuple[str, ...], set[Subscriber]] = {}
        self.count = 0
        self.closing = False
        self._previous = store.snapshot
        self._store = store
        store.on_change(self.changed)

    @property
    def full(self) -> bool:
        return self.count >= self.max_streams

    def subscribe(self, key: ClientKey) -> Subscriber:
        subscriber = Subscriber(key, config_etag(self._store.snapshot))
        self.by_globs.setdefault(key.globs, set()).add(subscriber)
        self.count += 1
        self.metrics.client_streams.inc()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        group = self.by_globs.get(subscriber.key.globs)
        if group is None or subscriber not in group:
            return
        group.discard(subscriber)
        if not group:
            del self.by_globs[subscriber.key.globs]
        self.count -= 1
        self.metrics.client_streams.dec()

    def pending(self) -> int:
        """Beacons waiting to be written, over every stream (each holds at most one)."""
        return sum(s.pending for group in self.by_globs.values() for s in group)

    def changed(self, snapshot: Snapshot) -> None:
        previous, self._previous = self._previous, snapshot
        if not self.by_globs:
            return
        keys = touched(previous, snapshot)
        if not keys:
            return
        etag = config_etag(snapshot)
        for globs, group in self.by_globs.items():
            if globs == ("*",) or any(fnmatchcase(k, g) for k in keys for g in globs):
                for subscriber in group:
                    subscriber.notify(etag)

    def close_all(self) -> None:
        """Shutting down: every stream ends its response now (clients reconnect elsewhere)."""
        self.closing = True
        self.end_streams()

    def end_streams(self) -> None:
        """Every open stream ends its response now; new ones are taken (their clients reconnect)."""
        for group in self.by_globs.values():
            for subscriber in group:
                subscriber.closing = True
                subscriber.wake.set()
                if not subscriber.shut.done():
                    subscriber.shut.set_result(None)  # a write stuck on a client not reading gives up


def touched(before: Snapshot, after: Snapshot) -> set[str]:
    old_flags, new_flags = before.flags, after.flags
    old_overrides, new_overrides = before.raw.items(OVERRIDES), after.raw.items(OVERRIDES)
    changed: set[str] = set()
    for key in _union(old_flags, new_flags):
        old, new = old_flags.get(key), new_flags.get(key)
        if old is new:
            continue
        if old is None or new is None or old_overrides.get(key) != new_overrides.get(key):
            changed.add(key)
        elif new.overridden is None or (old.default, old.served) != (new.default, new.served):
            changed.add(key)  # recompiled (a kill or promotion is a new flag on every build)
    return changed


def _union(a: Iterable[str], b: Iterable[str]) -> set[str]:
    return {*a, *b}
