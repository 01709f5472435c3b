"""What a vendor source's background pull shares: the loop, its wake-up, and bounded reads.

``PeriodicPull`` runs ``sync_once`` at start, every ``interval_s`` and soon after ``trigger`` (a
webhook); triggers that arrive during a pull coalesce into one more pull. A failed pull is counted
(``metrics.source_synced``) and handed to ``failed`` (the subclass logs it); the last good
definitions stay in the store. ``read_limited`` reads a response body up to a byte limit, so an
oversized body is dropped as soon as it crosses the limit rather than held whole.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from proxy.metrics import Metrics


class PeriodicPull:
    source = ""  # the source's name: metrics label and task name

    def __init__(
        self, interval_s: float, timeout_s: float, client: httpx.AsyncClient | None, metrics: Metrics | None
    ):
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics()
        self._client = client
        self._own_client = client is None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    async def sync_once(self) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """One pull failed (already counted)."""

    def succeeded(self) -> None:
        """One pull worked (the subclass counts it: a pull may succeed without writing)."""

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        return self._client

    async def start(self) -> None:
        if not self.enabled:
            return
        self._task = asyncio.create_task(self._run(), name=f"flagproxy-{self.source}-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_client and self._client is not None:
            await self._client.aclose()

    def trigger(self) -> None:
        """Ask for a pull soon; a burst of triggers during a pull coalesces into one more pull."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # counted and logged; the last good definitions stay
                self.metrics.source_synced(self.source, ok=False)
                self.failed(exc)
            else:
                self.succeeded()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)


class BodyTooLarge(Exception):
    pass


async def read_limited(response: httpx.Response, limit: int) -> bytes:
    """The (decoded) body, or BodyTooLarge once it exceeds ``limit`` bytes (declared or read)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Content-Length {declared}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():  # decoded: a compressed bomb counts in full
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
