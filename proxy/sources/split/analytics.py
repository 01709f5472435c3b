"""Split analytics: exposures become impressions and conversions become events, sent to Split.

``SplitAnalytics`` is the Split source's ``Analytics`` sink (``proxy.sources.base``). The request
path only appends to a bounded queue (``exposed``, ``converted``: O(1), never blocking or raising; a
full queue drops and counts). One background task does the rest: it re-evaluates each exposure with
``flag.explain`` for its label, builds the impression the SDK would build, de-duplicates and counts
it (``impressions.ImpressionTracker``), validates events as ``track()`` does, and posts in batches:

- ``POST {events_url}/testImpressions/bulk`` every ``impressions_refresh_s`` (or as soon as
  ``impressions_bulk_size`` are waiting), header ``SplitSDKImpressionsMode``;
- ``POST {events_url}/testImpressions/count`` every ``impression_counts_refresh_s``;
- ``POST {telemetry_url}/v1/keys/ss`` (unique keys: mode none, ``impressionsDisabled`` flags) every
  ``unique_keys_refresh_s`` (or once 30,000 keys are waiting);
- ``POST {events_url}/events/bulk`` every ``events_refresh_s`` (or at ``events_bulk_size`` events
  or 5 MB of them).

Every POST carries the SDK's headers (``Authorization: Bearer <sdk_key>``, ``SplitSDKVersion``,
``SplitSDKMachineIP`` and ``SplitSDKMachineName`` when the machine has an address) and a JSON body.
A failed POST (a connection error, a timeout of ``timeout_s``, HTTP 5xx, 408 or 429) is retried
``analytics_retries`` times, ``analytics_backoff_s`` doubling between attempts; then, or at once on
any other status, its items are dropped and counted as failed. ``close()`` sends what is queued, one
attempt per batch. At most one POST per endpoint is in flight; the request path never waits for any.
Nothing logged carries the SDK key; failures are logged at most once a minute per kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.engine import Flag, Served
from proxy.metrics import Metrics
from proxy.sources.split.impressions import (
    UNIQUE_KEYS_CACHE,
    Impression,
    ImpressionTracker,
    InvalidEvent,
    counts_payload,
    event_of,
    impression_of,
    impressions_payload,
    unique_keys_payloads,
)
from proxy.sources.split.settings import SplitSettings

log = logging.getLogger("flagproxy.split")

SDK_VERSION = "python-10.7.0"  # the SDK whose evaluation and payloads flagproxy reproduces
IMPRESSIONS, COUNTS, UNIQUE_KEYS, EVENTS = "impressions", "counts", "unique_keys", "events"
EVENTS_MAX_BYTES = 5 << 20  # the SDK flushes its events queue at this estimated size
UNIQUE_KEYS_RESET_S = 24 * 3600.0  # the SDK forgets which keys it reported once a day
DRAIN_S = 1.0  # the longest an exposure waits in the queue before it is processed
CHUNK = 500  # exposures processed between two yields to the event loop
LOG_EVERY_S = 60.0
MAX_BACKOFF_S = 60.0
RETRY_STATUSES = frozenset({408, 429})


def machine_identity() -> tuple[str, str]:
    """(address, name) as the SDK finds them: the address a UDP socket would send from (nothing is
    sent), the name ``ip-a-b-c-d``; ``unknown`` when there is no route."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("10.255.255.255", 1))
        address = str(sock.getsockname()[0])
    except OSError:
        return "unknown", "unknown"
    finally:
        sock.close()
    return address, "ip-" + address.replace(".", "-")


class _Throttled:
    """A warning per kind at most once a minute, with how many were not logged in between."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_EVERY_S:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += " (%d more like it in the last minute)"
            args = (*args, skipped)
        log.warning(message, *args)


class SplitAnalytics:
    """Split impressions and events for flagproxy's exposures and conversions (see the module doc).

    ``SplitAnalytics(settings, metrics=None, client=None)``: ``settings`` is the ``[split]`` section
    (``sdk_key`` required to send anything); ``client`` an ``httpx.AsyncClient`` to use (default: one
    of its own, with ``timeout_s``, closed by ``close()``).
    """

    def __init__(
        self,
        settings: SplitSettings,
        metrics: Metrics | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._client = client
        self._own_client = client is None
        self.tracker = ImpressionTracker(settings.impressions_mode, settings.impressions_dedup_keys)
        self._traffic_type = settings.traffic_type.strip().lower()
        self._exposures: deque[tuple[Flag, Served, Mapping[str, Any], int]] = deque()
        self._conversions: deque[tuple[Any, Any, Any, int, Any]] = deque()
        self._impressions: deque[Impression] = deque()  # built, waiting to be sent
        self._events: deque[tuple[dict[str, Any], int]] = deque()  # (item, size estimate)
        self._event_bytes = 0
        self._wake_at = max(1, min(settings.impressions_bulk_size, settings.impressions_queue_size // 2))
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._accepting = True
        self._closed = False
        self._headers: dict[str, str] = {}
        self._throttled = _Throttled()
        self._intervals = {
            IMPRESSIONS: settings.impressions_interval_s,
            COUNTS: settings.impression_counts_refresh_s,
            UNIQUE_KEYS: settings.unique_keys_refresh_s,
            EVENTS: settings.events_refresh_s,
        }
        impressions, events = self.metrics.split_impressions, self.metrics.split_events
        self._impressions_dropped = impressions.labels("dropped")
        self._events_dropped = events.labels("dropped")

    # --- the request path: O(1), never raises ------------------------------------------------------

    def exposed(self, flag: Flag, served: Served, context: Mapping[str, Any], at_ms: int) -> None:
        try:
            queue = self._exposures
            if not self._accepting or len(queue) >= self.settings.impressions_queue_size:
                self._impressions_dropped.inc()
                return
            queue.append((flag, served, context, at_ms))
            if len(queue) >= self._wake_at:
                self._wake.set()
        except Exception:  # never into the caller
            pass

    def converted(
        self, key: str, event: str, value: float | None, at_ms: int, properties: Mapping[str, Any] | None
    ) -> None:
        try:
            queue = self._conversions
            if not self._accepting or len(queue) >= self.settings.events_queue_size:
                self._events_dropped.inc()
                return
            queue.append((key, event, value, at_ms, properties))
            if len(queue) >= self.settings.events_bulk_size:
                self._wake.set()
        except Exception:  # never into the caller
            pass

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None or self._closed:
            return
        self._prepare()
        self._task = asyncio.create_task(self._run(), name="flagproxy-split-analytics")

    async def close(self) -> None:
        """Send what is queued (one attempt per batch), then stop; later calls are dropped."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake.set()
        try:
            if self._task is not None:
                await self._task
            else:  # never started: still send what was queued
                self._prepare()
                await self._finish()
        except Exception as exc:  # close() must end: what could not be sent is already counted
            log.error("Split analytics: closing failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._accepting = False
            if self._own_client and self._client is not None:
                await self._client.aclose()

    def _prepare(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout_s)
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.settings.sdk_key}",
            "SplitSDKVersion": SDK_VERSION,
        }
        address, name = machine_identity()
        if address not in ("NA", "unknown"):
            headers["SplitSDKMachineIP"] = address
            headers["SplitSDKMachineName"] = name
        self._headers = headers

    # --- the background task -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = {kind: now + interval for kind, interval in self._intervals.items()}
        forget_at = now + UNIQUE_KEYS_RESET_S
        while not self._closing.is_set():
            wait = min(DRAIN_S, max(0.0, min(due.values()) - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            if self._closing.is_set():
                break
            try:
                await self._drain()
                now = loop.time()
                if now >= forget_at:
                    self.tracker.forget_unique_keys()
                    forget_at = now + UNIQUE_KEYS_RESET_S
                for kind, interval in self._intervals.items():
                    if now >= due[kind]:
                        due[kind] = now + interval
                        self._send(kind)
                    elif self._urgent(kind):
                        self._send(kind)
            except Exception as exc:  # the task never dies: the next round carries on
                self._throttled.warning("loop", "Split analytics: %s: %s", type(exc).__name__, exc)
        await self._finish()

    async def _finish(self) -> None:
        """Process everything queued, let in-flight POSTs end, then send every endpoint's rest."""
        self._accepting = False
        await self._drain()
        for task in list(self._senders.values()):
            with contextlib.suppress(Exception):
                await task
        for kind in self._intervals:
            await self._flush(kind)

    def _urgent(self, kind: str) -> bool:
        if kind == IMPRESSIONS:
            return len(self._impressions) >= self.settings.impressions_bulk_size
        if kind == EVENTS:
            return (
                len(self._events) >= self.settings.events_bulk_size or self._event_bytes >= EVENTS_MAX_BYTES
            )
        if kind == UNIQUE_KEYS:
            return self.tracker.unique_pending > UNIQUE_KEYS_CACHE
        return False

    async def _drain(self) -> None:
        """Impressions and events from what is queued now (later arrivals wait for the next round)."""
        for done in range(1, len(self._exposures) + 1):
            flag, served, context, at_ms = self._exposures.popleft()
            try:
                self._expose(flag, served, context, at_ms)
            except Exception as exc:
                self.metrics.split_impressions.labels("failed").inc()
                self._throttled.warning(
                    "exposure", "Split impression not built: %s: %s", type(exc).__name__, exc
                )
            if done % CHUNK == 0:
                await asyncio.sleep(0)  # let requests run between chunks
        for _ in range(len(self._conversions)):
            try:
                self._convert(*self._conversions.popleft())
            except Exception as exc:
                self.metrics.split_events.labels("failed").inc()
                self._throttled.warning(
                    "conversion", "Split event not built: %s: %s", type(exc).__name__, exc
                )

    def _expose(self, flag: Flag, served: Served, context: Mapping[str, Any], at_ms: int) -> None:
        made = impression_of(flag, served, context, at_ms)
        if made is None:
            return
        impression, disabled = made
        queued = self.tracker.track(impression, disabled)
        if queued is None:
            counted = disabled or self.tracker.mode == "none"
            self.metrics.split_impressions.labels("counted" if counted else "deduplicated").inc()
        elif len(self._impressions) >= self.settings.impressions_queue_size:
            self._impressions_dropped.inc()
        else:
            self._impressions.append(queued)

    def _convert(self, key: Any, event: Any, value: Any, at_ms: int, properties: Any) -> None:
        try:
            item, size, many = event_of(key, event, value, at_ms, properties, self._traffic_type)
        except InvalidEvent as exc:
            self.metrics.split_events.labels("invalid").inc()
            self._throttled.warning("invalid event", "Split event %r not sent: %s", str(event)[:80], exc)
            return
        if many:
            self._throttled.warning(
                "many properties", "Split event %r has more than 300 properties: Split trims the rest", event
            )
        if len(self._events) >= self.settings.events_queue_size:
            self._events_dropped.inc()
            return
        self._events.append((item, size))
        self._event_bytes += size

    # --- sending -----------------------------------------------------------------------------------

    def _send(self, kind: str) -> None:
        """Start sending ``kind`` unless a POST of it is already in flight (it takes what is new)."""
        task = self._senders.get(kind)
        if task is None or task.done():
            self._senders[kind] = asyncio.create_task(self._flush(kind), name=f"flagproxy-split-{kind}")

    async def _flush(self, kind: str) -> None:
        try:
            if kind == IMPRESSIONS:
                await self._flush_impressions()
            elif kind == COUNTS:
                counts = self.tracker.pop_counts()
                if counts:
                    await self._post(
                        COUNTS, self._events_url("testImpressions/count"), counts_payload(counts)
                    )
            elif kind == UNIQUE_KEYS:
                for body in unique_keys_payloads(self.tracker.pop_unique_keys()):
                    if not await self._post(UNIQUE_KEYS, self._telemetry_url("v1/keys/ss"), body):
                        break  # the rest would fail too; they are reported again within a day
            else:
                await self._flush_events()
        except Exception as exc:  # counted where the items were taken; the sender ends cleanly
            self._throttled.warning(kind, "Split %s not sent: %s: %s", kind, type(exc).__name__, exc)

    async def _flush_impressions(self) -> None:
        queue, bulk = self._impressions, self.settings.impressions_bulk_size
        results = self.metrics.split_impressions
        while queue:
            batch = [queue.popleft() for _ in range(min(bulk, len(queue)))]
            url = self._events_url("testImpressions/bulk")
            ok = await self._post(IMPRESSIONS, url, impressions_payload(batch))
            results.labels("sent" if ok else "failed").inc(len(batch))
            if not ok and self._closing.is_set():
                results.labels("failed").inc(len(queue))
                queue.clear()

    async def _flush_events(self) -> None:
        queue, bulk = self._events, self.settings.events_bulk_size
        results = self.metrics.split_events
        while queue:
            batch = [queue.popleft() for _ in range(min(bulk, len(queue)))]
            self._event_bytes -= sum(size for _, size in batch)
            ok = await self._post(EVENTS, self._events_url("events/bulk"), [item for item, _ in batch])
            results.labels("sent" if ok else "failed").inc(len(batch))
            if not ok and self._closing.is_set():
                results.labels("failed").inc(len(queue))
                queue.clear()
                self._event_bytes = 0

    def _events_url(self, path: str) -> str:
        return self.settings.events_url.rstrip("/") + "/" + path

    def _telemetry_url(self, path: str) -> str:
        return self.settings.telemetry_url.rstrip("/") + "/" + path

    async def _post(self, endpoint: str, url: str, body: Any) -> bool:
        """POST ``body`` as JSON with retries; True once Split answered 2xx."""
        assert self._client is not None
        headers = self._headers
        if endpoint in (IMPRESSIONS, COUNTS):
            headers = {**headers, "SplitSDKImpressionsMode": self.settings.impressions_mode.upper()}
        posts = self.metrics.split_posts
        try:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:  # not expected: what is queued is JSON already
            self._throttled.warning(endpoint, "Split %s: not JSON (%s); not sent", endpoint, exc)
            return False
        attempts = 1 + self.settings.analytics_retries
        problem = ""
        for attempt in range(attempts):
            try:
                async with self._client.stream("POST", url, content=data, headers=headers) as response:
                    status = response.status_code  # the body is not read
                if 200 <= status < 300:
                    posts.labels(endpoint, "ok").inc()
                    return True
                problem = f"HTTP {status}"
                retry = status >= 500 or status in RETRY_STATUSES
            except httpx.HTTPError as exc:  # connection errors and timeouts
                problem, retry = type(exc).__name__, True
            except Exception as exc:  # anything else is not retried
                problem, retry = type(exc).__name__, False
            posts.labels(endpoint, "error").inc()
            if not retry or attempt + 1 == attempts or self._closing.is_set():
                break
            delay = min(MAX_BACKOFF_S, self.settings.analytics_backoff_s * 2**attempt)
            with contextlib.suppress(TimeoutError):  # closing cuts the wait short: one more attempt
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
        self._throttled.warning(
            endpoint, "Split %s: POST %s failed (%s); not sent", endpoint, url.split("?")[0], problem
        )
        return False
