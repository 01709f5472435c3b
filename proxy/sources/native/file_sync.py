"""The flags file, watched: an edit is validated whole and what it changed is applied.

An edit applies what changed in the file since this process last read it: flags added or whose
definition changed are written, flags removed from the file are deleted, and everything else in
the store is left alone. So a flag created through the admin API survives a file edit, and two
instances that see the same edit at different times (a ConfigMap reaches each pod on its own
schedule) write the same small change instead of each replacing the whole native state with its
copy. The edit's time orders the change (it wins over earlier writes of the flags it touches);
``updatedAt`` and a document ``version`` in the file do not hold it back.

The file's directory is watched, not the file: editors save by writing a new file and renaming it
over the old one, and a Kubernetes ConfigMap swaps a symlink; either would end a watch on the file
itself. Every couple of seconds the file's own status is also compared, which catches edits behind
a symlink and a directory that was deleted and created again. A file that does not parse or
validate is refused with one log line naming the problem, and the last good flags stay. A change
the store could not take (Redis away) is tried again until it goes in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from proxy.engine import FlagError, compile_document
from proxy.sources.native.document import SOURCE, now_stamp, parse_document
from proxy.store.base import FlagStore, StoreTimeout, StoreUnavailable
from proxy.store.change import Change, stored_text

log = logging.getLogger("flagproxy.sources.native")
ACTOR = "file"
CHECK_S = 2.0  # how often the file's status is compared, and a refused write retried
Signature = tuple[int, int, int, int] | None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _signature(path: Path) -> Signature:
    """What changes when the file (behind any symlink) changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_flags(data: bytes, where: str) -> dict[str, str]:
    """A flags file's flags as stored text, validated whole (FlagError names the flag and field)."""
    document = parse_document(data, where)
    if not isinstance(document.get("flags"), dict):
        raise FlagError(where, "expected a JSON object with a 'flags' object")
    compile_document(document)
    flags: dict[str, Any] = document["flags"]
    return {key: stored_text(definition) for key, definition in flags.items()}


def edit_change(before: dict[str, str], after: dict[str, str]) -> Change:
    """What an edit from ``before`` to ``after`` changed, as one store change."""
    upsert = {key: text for key, text in after.items() if before.get(key) != text}
    delete = [key for key in before if key not in after]
    return Change(source=SOURCE, upsert=upsert, delete=delete, stamp=now_stamp(), supersede=True, actor=ACTOR)


class FlagsFileSync:
    """A ``Sync`` of the native source: the flags file, re-read on change and on ``trigger()``."""

    def __init__(
        self, path: str | Path, store: FlagStore, watch: bool = True, debounce_ms: int = 200
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.watch = watch  # False: re-read on SIGHUP only
        self.debounce_ms = debounce_ms
        self._digest = ""  # of the content last read (applied or refused)
        self._base: dict[str, str] = {}  # the flags of the content last applied
        self._pending: Change | None = None  # applied when the store takes writes again
        self._waiting = False  # the store refused the pending change: said once
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return True

    async def start(self) -> None:
        data = await asyncio.to_thread(self._read)
        if data is not None:
            self._digest = _digest(data)
            with contextlib.suppress(FlagError):  # it was validated when the store was built
                self._base = file_flags(data, str(self.path))
        self._tasks = [asyncio.create_task(self._run(), name="flagproxy-flags-file-sync")]
        if self.watch:
            self._tasks.append(asyncio.create_task(self._watch(), name="flagproxy-flags-file-watch"))

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def trigger(self) -> None:
        """Re-read the file soon (SIGHUP); never blocks."""
        self._wake.set()

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    async def _watch(self) -> None:
        from watchfiles import awatch  # imported where a file is watched (inotify, else polling)

        name = self.path.name

        def ours(_change: object, path: str) -> bool:
            entry = Path(path).name  # the file itself, or a ConfigMap's ..data symlink swapped under it
            return entry == name or entry.startswith("..")

        seen = _signature(self.path)
        while not self._stop.is_set():
            directory = self.path.parent
            place = _signature(directory)
            try:
                async for changes in awatch(
                    directory,
                    stop_event=self._stop,
                    debounce=self.debounce_ms,
                    recursive=False,
                    watch_filter=ours,
                    rust_timeout=int(CHECK_S * 1000),
                    yield_on_timeout=True,
                ):
                    now = _signature(self.path)
                    if changes or now != seen:
                        seen = now
                        self._wake.set()
                    if _signature(directory) != place:
                        break  # deleted, or replaced: watch the new one
            except Exception as exc:  # the directory is gone, or the watcher failed: look again
                log.debug("watching %s: %s; looking again in %.0f s", directory, exc, CHECK_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), CHECK_S)

    async def _run(self) -> None:
        while True:
            timeout = CHECK_S if self._pending is not None else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self.reload()
            except Exception:  # the watch must outlive any one bad reload
                log.exception("reloading the flags file %s failed", self.path)

    async def reload(self) -> str:
        """Read, validate and apply the file if its content changed; the outcome as a word."""
        data = await asyncio.to_thread(self._read)
        if data is None:
            if self.path.exists():
                log.error("flags file %s cannot be read: keeping the last good flags", self.path)
                return "unreadable"
            log.warning("flags file %s is gone: keeping the last good flags", self.path)
            return "missing"
        digest = _digest(data)
        if digest == self._digest:
            return await self._retry() if self._pending is not None else "same"
        self._digest = digest  # a refused content is reported once, not on every event
        try:
            after = await asyncio.to_thread(file_flags, data, str(self.path))
        except FlagError as exc:
            log.error("flags file %s rejected, keeping the last good flags: %s", self.path, exc)
            return "rejected"
        change = edit_change(self._base, after)
        self._base = after  # the next edit is compared with this one, applied now or on a retry
        if not change.upsert and not change.delete:
            self._pending = None
            return "unchanged"
        if self._pending is not None:  # an earlier edit not yet written: this one includes it
            merged = {**self._pending.upsert, **change.upsert}
            change.upsert = {key: text for key, text in merged.items() if key not in change.delete}
            change.delete = sorted((set(self._pending.delete) - set(change.upsert)) | set(change.delete))
        self._pending = change
        return await self._retry()

    async def _retry(self) -> str:
        change = self._pending
        assert change is not None
        change.stamp = now_stamp()
        try:
            result = await self.store.apply(change)
        except (StoreUnavailable, StoreTimeout) as exc:
            if not self._waiting:  # one line per outage, not one per retry
                log.warning(
                    "flags file %s not applied yet (%s): trying every %.0f s", self.path, exc, CHECK_S
                )
            self._waiting = True
            return "unavailable"
        self._pending = None
        self._waiting = False
        log.info(
            "flags file %s reloaded: %s (%d upserted, %d deleted), store version %d",
            self.path,
            result.status,
            len(change.upsert),
            len(change.delete),
            result.version,
        )
        return result.status
