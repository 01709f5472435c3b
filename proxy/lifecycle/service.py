"""The lifecycle's moving parts in one proxy: first-seen times and usage to the store, the stale
report, the daily digest and change notices (docs/lifecycle.md).

Nothing here runs on the request path: the usage observer only counts in memory; a background task
records first-seen times for new flags, flushes usage every ``[lifecycle] flush_interval_s`` and
checks once a minute whether the digest is due. The clock is injectable (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.alerts import mrkdwn_escape
from proxy.config import Settings
from proxy.lifecycle.notify import Notifier, Notifiers
from proxy.lifecycle.stale import Policy, Usage, iso, stale_flags
from proxy.lifecycle.usage import UsageCounter, fingerprints
from proxy.store.base import FlagStore, Snapshot, StoreUnavailable
from proxy.store.change import Change
from proxy.store.ledger import Ledger, MemoryLedger
from proxy.store.state import OVERRIDES, ApplyResult

log = logging.getLogger("flagproxy.lifecycle")

REASON_TEXT = {
    "lifetime": "older than its type's lifetime",
    "expired": "past its expiresAt",
    "single_variant": "one outcome for everyone, unchanged",
    "unused": "not evaluated",
}
LIFECYCLE_FIELDS = ("type", "owner", "createdAt", "expiresAt")
NOTICE_KEYS = 10  # keys named in one change notice; more are counted


def definitions_of(snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    """Each served flag's lifecycle fields (native definitions carry them; other sources': none)."""
    out: dict[str, dict[str, Any]] = {}
    for key, flag in snapshot.flags.items():
        fields: dict[str, Any] = {}
        if flag.source == "native":
            text = snapshot.raw.items("native").get(key)
            with contextlib.suppress(ValueError, TypeError):
                definition = json.loads(text) if text is not None else {}
                if isinstance(definition, dict):
                    fields = {f: definition[f] for f in LIFECYCLE_FIELDS if f in definition}
        out[key] = fields
    return out


def summarize(change: Change, key: str, before: Snapshot) -> str:
    """What ``change`` did to ``key``, in a few words."""
    if change.source == OVERRIDES:
        if change.action == "promote":
            with contextlib.suppress(ValueError, TypeError):
                return f"promoted {json.loads(change.upsert[key])['promote']}"
        return {"kill": "killed", "restore": "restored"}.get(change.action, change.action or "override")
    kind = "" if change.kind == "flags" else f"{change.kind} "
    old = before.raw.items(change.source, change.kind).get(key)
    new = change.upsert.get(key)
    if new is None:
        return f"{kind}deleted"
    if old is None:
        return f"{kind}created"
    try:
        was, now = json.loads(old), json.loads(new)
    except ValueError:
        return f"{kind}changed"
    if isinstance(was, dict) and isinstance(now, dict):
        fields = sorted({f for f in (*was, *now) if was.get(f) != now.get(f)})
        if fields:
            return f"{kind}changed " + ", ".join(fields)
    return f"{kind}changed"


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        store: FlagStore,
        notifiers: Notifiers,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        lc = settings.lifecycle
        self.policy = Policy(lc.lifetimes(), lc.default_type, lc.stale_after_days)
        self.store = store
        self.notifiers = notifiers
        self.ledger: Ledger = ledger or getattr(store, "ledger", None) or MemoryLedger()
        self.clock = clock
        self.counter = UsageCounter()
        self.first_seen: dict[str, float] = {}  # as the store last answered
        self._known: dict[str, float] = {}  # every first-seen time learnt (written back after data loss)
        self.last_report: dict[str, list[str]] = {}  # flag → reasons, as last computed (the console)
        self._task: asyncio.Task[None] | None = None
        self.digests_sent = 0
        self._store_away = False  # said once per outage: the store logs the outage itself
        self._reached = False  # a flush reached the store: a refusal after it is an outage (before it, the
        # store is still connecting, and says so itself if it cannot)
        store.on_change(self.on_snapshot)
        on_apply = getattr(store, "on_apply", None)
        if on_apply is not None:
            on_apply(self.on_applied)
        self.on_snapshot(store.snapshot)

    # --- snapshots and usage --------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self.counter.use(fingerprints(snapshot), self.clock())

    async def flush(self) -> None:
        """First-seen times of new flags and the usage counted since the last flush, to the store."""
        now = self.clock()
        # flags the store did not answer for last time: new, or lost with the store's data
        missing = {k: self._known.get(k, now) for k in self.store.snapshot.flags if k not in self.first_seen}
        written = True
        try:
            self.first_seen = await self.ledger.first_seen(missing)
            self._known.update(self.first_seen)
        except StoreUnavailable as exc:
            written = self._away(exc)
        except Exception as exc:
            log.warning("lifecycle: could not record first-seen times: %s", exc)
        deltas = self.counter.drain()
        try:
            await self.ledger.add_usage(deltas)
        except StoreUnavailable as exc:
            self.counter.restore(deltas)
            written = self._away(exc)
        except Exception as exc:
            self.counter.restore(deltas)
            log.warning("lifecycle: could not write usage counters: %s", exc)
        if written and self._store_away:
            self._store_away = False
            log.info("lifecycle: first-seen times and usage counters reach the store again")
        self._reached |= written

    def _away(self, exc: StoreUnavailable) -> bool:
        """The store cannot take the ledger's writes (Redis away): one line until it can again,
        not one per flush (the store logs the outage itself, once). False: nothing was written."""
        if not self._reached:  # at start the store is still connecting: not an outage
            return False
        if not self._store_away:
            self._store_away = True
            log.warning("lifecycle: the store is unavailable (%s); usage is counted in memory meanwhile", exc)
        return False

    # --- the report -----------------------------------------------------------------------------

    async def report(self, now: float | None = None) -> list[dict[str, Any]]:
        """The potentially stale flags now (reads the store: first-seen times and usage)."""
        await self.flush()
        at = self.clock() if now is None else now
        records = await self.ledger.usage()
        usage: dict[str, Usage] = {}
        for key, r in records.items():
            with contextlib.suppress(ValueError, TypeError):
                last = float(r.get("last", 0))
                usage[key] = Usage(
                    changed_at=float(r["changed"]),
                    last_evaluated=last if last > 0 else None,
                    values=frozenset(str(v) for v in r.get("values", [])),
                )
        first_seen = {**self._known, **self.first_seen}
        stale = stale_flags(definitions_of(self.store.snapshot), first_seen, usage, at, self.policy)
        self.last_report = {s["flag"]: s["reasons"] for s in stale}
        return stale

    # --- the digest -----------------------------------------------------------------------------

    def digest_channel(self) -> Notifier | None:
        channel = self.settings.lifecycle.digest_channel or self.settings.alerts.slack_webhook_url
        return self.notifiers.for_channel(channel)

    async def digest_tick(self, now: float | None = None) -> list[str]:
        """At ``[lifecycle] digest_hour`` (UTC): one message naming the stale flags not yet named
        today (claimed in the store, so once a day per flag across instances). The flags sent."""
        hour = self.settings.lifecycle.digest_hour
        at = self.clock() if now is None else now
        moment = datetime.fromtimestamp(at, UTC)
        if hour < 0 or moment.hour != hour:
            return []
        stale = await self.report(at)
        if not stale:
            return []
        claimed = set(await self.ledger.claim_digest(moment.date().isoformat(), [s["flag"] for s in stale]))
        named = [s for s in stale if s["flag"] in claimed]
        if not named:
            return []
        lines = [f"*flagproxy: {len(named)} potentially stale flag{'s' if len(named) != 1 else ''}*"]
        for s in named:
            reasons = ", ".join(REASON_TEXT.get(r, r) for r in s["reasons"])
            owner = mrkdwn_escape(s["owner"]) if s["owner"] else "no owner"
            lines.append(f"• `{mrkdwn_escape(s['flag'])}` ({owner}): {reasons} (stale since {s['since']})")
        text = "\n".join(lines)
        log.info("stale digest: %s", ", ".join(s["flag"] for s in named))
        notifier = self.digest_channel()
        if notifier is not None:
            notifier.post("digest", text)
        self.digests_sent += 1
        return [s["flag"] for s in named]

    # --- change notices -------------------------------------------------------------------------

    def on_applied(self, change: Change, result: ApplyResult, before: Snapshot) -> None:
        """One INFO line per changed flag, one notice per change (this instance applied it)."""
        actor = change.actor or "unknown"
        parts: list[str] = []
        for key in result.changed:
            summary = summarize(change, key, before)
            log.info(
                "change: actor=%s flag=%s summary=%s version=%d",
                actor,
                key,
                summary,
                result.version,
                extra={"actor": actor, "flag": key, "summary": summary, "store_version": result.version},
            )
            if len(parts) < NOTICE_KEYS:
                parts.append(f"`{mrkdwn_escape(key)}` {mrkdwn_escape(summary)}")
        more = len(result.changed) - len(parts)
        if more > 0:
            parts.append(f"and {more} more")
        notifier = self.notifiers.for_channel(self.settings.alerts.change_channel)
        if notifier is not None and parts:
            notifier.post(
                "change", f"flagproxy: {mrkdwn_escape(actor)}: {'; '.join(parts)} (version {result.version})"
            )

    # --- the background task --------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="flagproxy-lifecycle")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=2.0)

    async def _run(self) -> None:
        interval = self.settings.lifecycle.flush_interval_s
        tick_s = min(1.0, interval)
        last_flush = last_digest = float("-inf")
        while True:
            now = time.monotonic()
            try:
                if now - last_flush >= interval:
                    last_flush = now
                    await self.report()  # flushes, and refreshes the console's stale markers
                if now - last_digest >= 60.0:
                    last_digest = now
                    await self.digest_tick()
            except StoreUnavailable as exc:
                self._away(exc)
            except Exception:
                log.exception("lifecycle task failed; retrying")
            await asyncio.sleep(tick_s)

    def marker(self, key: str) -> list[str] | None:
        """The reasons ``key`` was last found potentially stale (None: it was not)."""
        return self.last_report.get(key)


def checked_at(now: float) -> str:
    return iso(now)
