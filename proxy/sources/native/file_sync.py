"""The flags file, watched: an edit is validated whole and applied like a whole-document webhook.

The file's directory is watched, not the file: editors save by writing a new file and renaming it
over the old one, and a Kubernetes ConfigMap swaps a symlink, and either would end a watch on the
file itself. Any event there (debounced) re-reads the file; only new content is applied. A file
that does not parse or validate is rejected with one log line naming the problem, and the last
good flags stay. Applying replaces the native flags with the file's (flags missing from it are
deleted), at the time of the edit: like ``flagd``'s file sync, the file is the truth once edited.

Started, it only remembers the content it was started with: with Redis the flags file seeds an
empty store and must not overwrite the shared state each time an instance starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

from proxy.engine import FlagError
from proxy.sources.native.document import change_from_payload, now_stamp, parse_document
from proxy.store.base import FlagStore, StoreTimeout, StoreUnavailable
from proxy.store.change import Change

log = logging.getLogger("flagproxy.sources.native")
ACTOR = "file"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FlagsFileSync:
    """A ``Sync`` of the native source: the flags file, re-read on change and on ``trigger()``."""

    def __init__(
        self, path: str | Path, store: FlagStore, watch: bool = True, debounce_ms: int = 200
    ) -> None:
        self.path = Path(path)
        self.watch = watch  # False: re-read on SIGHUP only
        self.store = store
        self.debounce_ms = debounce_ms
        self._digest = ""
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reloads = 0  # outcomes seen, for tests and the log: applied, unchanged, rejected…

    @property
    def enabled(self) -> bool:
        return True

    async def start(self) -> None:
        self._digest = await asyncio.to_thread(self._read_digest)
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

    def _read_digest(self) -> str:
        try:
            return _digest(self.path.read_bytes())
        except OSError:
            return ""

    async def _watch(self) -> None:
        from watchfiles import awatch  # imported where a file is watched (inotify, else polling)

        directory = self.path.parent
        name = self.path.name

        def ours(_change: object, path: str) -> bool:
            # the file itself, or a ConfigMap's ..data symlink swapped under it
            entry = Path(path).name
            return entry == name or entry.startswith("..")

        while not self._stop.is_set():
            try:
                async for _changes in awatch(
                    directory,
                    stop_event=self._stop,
                    debounce=self.debounce_ms,
                    recursive=False,
                    watch_filter=ours,
                ):
                    self._wake.set()
            except (OSError, RuntimeError) as exc:  # the directory went away; look again later
                log.warning("cannot watch %s (%s); retrying in 5 s (SIGHUP re-reads it)", directory, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 5)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.reload()
            except Exception:  # the watch must outlive any one bad reload
                log.exception("reloading the flags file %s failed", self.path)

    async def reload(self) -> str:
        """Read, validate and apply the file if its content changed; the outcome as a word."""
        outcome = await self._reload()
        self.reloads += 1
        return outcome

    async def _reload(self) -> str:
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            log.warning("flags file %s is gone: keeping the last good flags", self.path)
            return "missing"
        except OSError as exc:
            log.error("flags file %s cannot be read (%s): keeping the last good flags", self.path, exc)
            return "unreadable"
        digest = _digest(data)
        if digest == self._digest:
            return "same"
        try:
            change = await asyncio.to_thread(self._validated, data)
        except FlagError as exc:
            log.error("flags file %s rejected, keeping the last good flags: %s", self.path, exc)
            self._digest = digest  # said once per content, not again on every event
            return "rejected"
        try:
            result = await self.store.apply(change)
        except (StoreUnavailable, StoreTimeout) as exc:
            log.warning("flags file %s not applied (%s): will try again on the next change", self.path, exc)
            return "unavailable"
        self._digest = digest
        if result.status in ("applied", "unchanged"):
            log.info(
                "flags file %s reloaded: %s, %d flags, store version %d",
                self.path,
                result.status,
                len(change.upsert),
                result.version,
            )
        else:
            log.error(
                "flags file %s not applied: %s (store version %d)", self.path, result.status, result.version
            )
        return result.status

    def _validated(self, data: bytes) -> Change:
        document = parse_document(data, str(self.path))
        if "flags" not in document:
            raise FlagError(str(self.path), "expected a JSON object with a 'flags' object")
        change = change_from_payload(document, actor=ACTOR, stamp=now_stamp())
        # The edit's time orders it, not the flags' updatedAt: an operator who edits a flag in the
        # file and leaves its updatedAt as it was still means the edit.
        change.item_versions = {}
        change.supersede = True
        return change
