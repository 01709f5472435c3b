"""Slack alerts for the header budget, and notices (flag changes, the stale digest), sent in the
background.

``notify`` is synchronous and cheap: it deduplicates per (origin, route pattern, condition) with a
cooldown and puts the message on a bounded queue (full → dropped and counted). A single sender
task posts to the Slack incoming webhook with httpx (``post_json``: honours ``429 Retry-After``,
retries 5xx a little), and logs and counts failures. Nothing here can slow down or fail a proxied
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from proxy.config import AlertSettings
from proxy.metrics import Metrics

log = logging.getLogger("flagproxy.alerts")

MAX_RETRY_AFTER_S = 60.0
MAX_ATTEMPTS = 3

CONDITION_TEXT = {
    "near_limit": "is close to the request-header limit",
    "trimmed": "had flags trimmed to fit the request-header limit",
    "over_budget": "is over the request-header limit even without flags",
    "preflight": "can exceed the request-header limit (pre-flight worst case)",
}


def mrkdwn_escape(text: str) -> str:
    """Slack's control characters escaped: a request id comes from the client and must not be able
    to ping a channel (``<!channel>``) or plant a link (``<https://…|…>``) in the alert."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass
class Alert:
    condition: str  # near_limit | trimmed | over_budget | preflight
    origin: str
    route: str
    used: int
    budget: int
    largest: Sequence[tuple[str, int]] = ()
    omitted: Sequence[str] = ()
    request_id: str = ""

    def summary(self) -> str:
        """One line for the log (cheap: no Slack blocks)."""
        what = CONDITION_TEXT.get(self.condition, self.condition)
        size = f"{self.used} of {self.budget} bytes"
        return f"flagproxy: requests to {self.origin} {self.route} {what} — {size}"

    def message(self) -> dict[str, Any]:
        pct = 100 * self.used / self.budget if self.budget else 0
        what = CONDITION_TEXT.get(self.condition, self.condition)
        size = f"{self.used:,} of {self.budget:,} bytes ({pct:.0f} %)"
        origin, route = mrkdwn_escape(self.origin), mrkdwn_escape(self.route)
        text = f"flagproxy: requests to {origin} {route} {what} — {size}"
        fields = [
            {"type": "mrkdwn", "text": f"*Origin*\n`{origin}`"},
            {"type": "mrkdwn", "text": f"*Route*\n`{route}`"},
            {
                "type": "mrkdwn",
                "text": f"*Bytes used / budget*\n{self.used:,} / {self.budget:,} ({pct:.0f} %)",
            },
            {"type": "mrkdwn", "text": f"*Condition*\n{self.condition}"},
        ]
        largest = ", ".join(f"`{mrkdwn_escape(k)}` {n:,} B" for k, n in self.largest) or "—"
        omitted = ", ".join(f"`{mrkdwn_escape(k)}`" for k in list(self.omitted)[:20]) or "nothing"
        if len(self.omitted) > 20:
            omitted += f" and {len(self.omitted) - 20} more"
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{text}*"}},
            {"type": "section", "fields": fields},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*Largest flags*: {largest}"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*Omitted*: {omitted}"}},
        ]
        if self.request_id:
            rid = mrkdwn_escape(self.request_id)
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"request id {rid}"}]})
        return {"text": text, "blocks": blocks}


@dataclass
class Notice:
    """One plain message (a flag change, the stale digest) for a Slack incoming webhook: ``url``, or
    ``[alerts] slack_webhook_url`` when empty. ``text`` is Slack mrkdwn, already escaped."""

    condition: str  # the metric's label: "change" | "digest"
    text: str
    url: str = ""

    def message(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass
class AlertStats:
    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    dropped: int = 0
    by_condition: dict[str, int] = field(default_factory=dict)


class Alerter:
    def __init__(
        self, settings: AlertSettings, client: httpx.AsyncClient | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._client = client
        self._own_client = client is None
        self._queue: asyncio.Queue[Alert | Notice] = asyncio.Queue(maxsize=settings.queue_size)
        self._last: dict[tuple[str, str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._drop_logged = float("-inf")
        self.stats = AlertStats()

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout_s)
        self._task = asyncio.create_task(self._send_forever(), name="flagproxy-alerts")

    async def close(self, flush_timeout_s: float = 5.0) -> None:
        """Flush what is queued (bounded), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=flush_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_client and self._client is not None:
            await self._client.aclose()

    def cooling_down(self, origin: str, route: str, condition: str) -> bool:
        """Would an alert for this key be suppressed now? (Counted as suppressed when it would.) Lets a
        caller skip building an alert — sorting flags by size — that would not be sent anyway."""
        last = self._last.get((origin, route, condition))
        if last is None or time.monotonic() - last >= self.settings.cooldown_s:
            return False
        self.stats.suppressed += 1
        self.metrics.alert(condition, "suppressed")
        return True

    def notify(self, alert: Alert) -> bool:
        """Queue ``alert`` unless the same condition fired for this origin and route within the cooldown."""
        key = (alert.origin, alert.route, alert.condition)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.settings.cooldown_s:
            self.stats.suppressed += 1
            self.metrics.alert(alert.condition, "suppressed")
            return False
        if len(self._last) > 10_000:  # bounded memory under any number of routes
            self._last.clear()
        self._last[key] = now
        self.stats.by_condition[alert.condition] = self.stats.by_condition.get(alert.condition, 0) + 1
        log.warning(
            "%s", alert.summary(), extra={"request_id": alert.request_id or None, "origin": alert.origin}
        )
        if not self.settings.slack_webhook_url:
            self.metrics.alert(alert.condition, "logged")  # no Slack configured: the log line is the alert
            return True
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            # Not sent, so it must not start the cooldown: the next occurrence gets another chance.
            if last is None:
                self._last.pop(key, None)
            else:
                self._last[key] = last
            self.stats.dropped += 1
            self.metrics.alert(alert.condition, "dropped")
            now = time.monotonic()
            if now - self._drop_logged >= 10.0:  # one line per 10 s, not one per dropped alert
                self._drop_logged = now
                log.warning("alert queue full: dropping alerts (%d so far)", self.stats.dropped)
            return False
        return True

    def post(self, notice: Notice) -> bool:
        """Queue ``notice`` (no cooldown: the caller deduplicates); False when it cannot be sent."""
        if not (notice.url or self.settings.slack_webhook_url):
            return False
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self.metrics.alert(notice.condition, "dropped")
            log.warning("alert queue full: %s notice dropped", notice.condition)
            return False
        return True

    async def _send_forever(self) -> None:
        interval = 1.0 / self.settings.max_per_second
        last_post = float("-inf")
        while True:
            alert = await self._queue.get()
            try:
                # Slack allows about one message a second; pacing also caps what alerting costs the proxy.
                wait = last_post + interval - time.monotonic()
                if wait > 0.001:
                    await asyncio.sleep(wait)
                last_post = time.monotonic()
                await self._send(alert)
            except Exception as exc:  # never let one alert stop the sender
                self.stats.failed += 1
                self.metrics.alert(alert.condition, "failed")
                log.error("Slack alert failed: %s", type(exc).__name__)
            finally:
                self._queue.task_done()

    async def _send(self, alert: Alert | Notice) -> None:
        assert self._client is not None
        url = (alert.url if isinstance(alert, Notice) else "") or self.settings.slack_webhook_url
        outcome = await post_json(self._client, url, alert.message())
        if isinstance(outcome, httpx.Response) and outcome.status_code == 200:
            self.stats.sent += 1
            self.metrics.alert(alert.condition, "sent")
            return
        self.stats.failed += 1
        self.metrics.alert(alert.condition, "failed")
        if isinstance(outcome, httpx.HTTPError):
            log.error("Slack alert failed after %d attempts: %s", MAX_ATTEMPTS, type(outcome).__name__)
        else:
            log.error("Slack answered %d %.100s; alert not delivered", outcome.status_code, outcome.text)


async def post_json(client: httpx.AsyncClient, url: str, payload: Any) -> httpx.Response | httpx.HTTPError:
    """POST ``payload`` as JSON, up to ``MAX_ATTEMPTS`` times: a transport error or a 5xx is retried
    after 0.5 s times the attempt, a 429 after its ``Retry-After``. The last answer, or the last error."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response = await client.post(url, json=payload)
        except httpx.HTTPError as exc:
            if attempt == MAX_ATTEMPTS:
                return exc
            await asyncio.sleep(0.5 * attempt)
            continue
        if attempt < MAX_ATTEMPTS and response.status_code == 429:
            await asyncio.sleep(retry_after(response))
        elif attempt < MAX_ATTEMPTS and response.status_code >= 500:
            await asyncio.sleep(0.5 * attempt)
        else:
            return response
    raise AssertionError("unreachable: the last attempt returns")  # pragma: no cover


def retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "1")
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        return 1.0
