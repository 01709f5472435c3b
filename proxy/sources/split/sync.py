"""Split (Harness FME) sync: pull splitChanges / segmentChanges into the store.

Split's audit-log webhook carries no usable definition (see docs), so it only *triggers* a pull.
Pulls also run at start and every ``[split] interval_s`` (webhooks get lost). A pull asks for
changes since the stored change numbers until ``since == till`` (at most ``[split] max_pages``
pages), then segments for every segment the flags reference. Results are written as store Changes
ordered by Split's change numbers: ACTIVE flags upserted, ARCHIVED ones deleted. A failing or
garbled API leaves the last good definitions in place; the error is logged and counted. So does a
body larger than ``[split] max_response_bytes``: it is streamed and dropped as soon as it crosses the
limit, never held whole (a 116 MB page once took 1.8 GB and 24 s of the event loop).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from proxy.metrics import Metrics
from proxy.sources.pulling import BodyTooLarge, PeriodicPull, read_limited
from proxy.sources.split.documents import referenced_segments
from proxy.sources.split.settings import SplitSettings
from proxy.store.change import Change, stored_text

if TYPE_CHECKING:
    from proxy.store.base import FlagStore

log = logging.getLogger("flagproxy.split")

SOURCE = "split"


class SplitApiError(Exception):
    """The Split API failed or answered something that is not a splitChanges/segmentChanges body."""


@dataclass
class Pulled:
    upsert: dict[str, str] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    till: int = -1


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SplitApiError(f"{what} is not an integer: {value!r}")
    return value


def _page(body: Any, spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Normalise a splitChanges body to spec 1.3 sections ``(ff, rbs)``, each ``{d, s, t}``."""
    if not isinstance(body, dict):
        raise SplitApiError("splitChanges body is not a JSON object")
    ff: Any
    rbs: Any
    if spec == "1.1":
        ff = {"d": body.get("splits"), "s": body.get("since"), "t": body.get("till")}
        rbs = {"d": [], "s": -1, "t": -1}
    else:
        ff, rbs = body.get("ff"), body.get("rbs", {"d": [], "s": -1, "t": -1})
    for name, section in (("ff", ff), ("rbs", rbs)):
        if not isinstance(section, dict) or not isinstance(section.get("d"), list):
            raise SplitApiError(f"splitChanges section {name!r} is missing or has no 'd' list")
        _int(section.get("s"), f"{name}.s")
        _int(section.get("t"), f"{name}.t")
    return ff, rbs


def _collect(pulled: Pulled, items: Iterable[Any], what: str) -> None:
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            log.warning("skipping a %s without a name from the Split API", what)
            continue
        name = item["name"]
        version = item.get("changeNumber")
        if isinstance(version, int) and not isinstance(version, bool):
            pulled.versions[name] = version
        if item.get("status", "ACTIVE") == "ACTIVE":
            pulled.upsert[name] = stored_text(item)
            with contextlib.suppress(ValueError):
                pulled.delete.remove(name)
        else:  # ARCHIVED (and anything not ACTIVE): removed, as the SDK does
            pulled.upsert.pop(name, None)
            if name not in pulled.delete:
                pulled.delete.append(name)


class SplitSync(PeriodicPull):
    source = SOURCE

    def __init__(
        self,
        settings: SplitSettings,
        store: FlagStore,
        client: httpx.AsyncClient | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(settings.interval_s, settings.timeout_s, client, metrics)
        self.settings = settings
        self.store = store
        self._spec = "1.3"

    @property
    def enabled(self) -> bool:
        return bool(self.settings.sdk_key)

    def failed(self, exc: Exception) -> None:
        log.error("Split sync failed: %s", exc)

    # --- one pull ---------------------------------------------------------------------------------

    def _stored(self, kind: str) -> int:
        return self.store.snapshot.raw.source_versions.get(SOURCE, {}).get(kind, -1)

    async def _get(self, path: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """GET ``path``: (status, body), the body read up to ``max_response_bytes`` (SplitApiError above)."""
        url = self.settings.api_url.rstrip("/") + path
        headers = {"Authorization": f"Bearer {self.settings.sdk_key}"}
        limit = self.settings.max_response_bytes
        try:
            async with self.client.stream("GET", url, params=params, headers=headers) as response:
                if response.status_code != 200:
                    return response.status_code, b""
                return 200, await read_limited(response, limit)
        except BodyTooLarge as exc:
            detail = f": {exc}" if str(exc).startswith("Content-Length") else ""
            raise SplitApiError(
                f"GET {path}: the body exceeds [split] max_response_bytes ({limit} bytes){detail}"
            ) from None
        except httpx.HTTPError as exc:
            raise SplitApiError(f"GET {path}: {type(exc).__name__}: {exc}") from None

    async def _split_changes(self, since: int, rb_since: int) -> Any:
        params: dict[str, Any] = {"s": self._spec, "since": since}
        if self._spec == "1.3":
            params["rbSince"] = rb_since
        status, body = await self._get("/splitChanges", params)
        if status == 400 and self._spec == "1.3":
            log.warning("the Split API refused spec 1.3 (HTTP 400): falling back to spec 1.1")
            self._spec = "1.1"
            return await self._split_changes(since, rb_since)
        if status != 200:
            raise SplitApiError(f"splitChanges answered HTTP {status}")
        try:
            return json.loads(body)
        except ValueError:
            raise SplitApiError("splitChanges answered something that is not JSON") from None

    async def sync_once(self) -> None:
        async with self._lock:
            await self._sync_flags()
            await self._sync_segments()
            self.metrics.source_synced(SOURCE, ok=True)

    async def _sync_flags(self) -> None:
        since, rb_since = self._stored("flags"), self._stored("rbsegments")
        flags, rbs = Pulled(till=since), Pulled(till=rb_since)
        for _ in range(self.settings.max_pages):
            ff_page, rbs_page = _page(await self._split_changes(flags.till, rbs.till), self._spec)
            _collect(flags, ff_page["d"], "feature flag")
            _collect(rbs, rbs_page["d"], "rule-based segment")
            flags.till = max(flags.till, ff_page["t"])
            if self._spec == "1.3":
                rbs.till = max(rbs.till, rbs_page["t"])
            if ff_page["s"] == ff_page["t"] and (self._spec == "1.1" or rbs_page["s"] == rbs_page["t"]):
                break
        else:
            pages = self.settings.max_pages
            raise SplitApiError(f"splitChanges did not settle (since == till) within {pages} pages")
        await self._write("rbsegments", rbs, rb_since)
        await self._write("flags", flags, since)

    async def _write(self, kind: str, pulled: Pulled, stored: int) -> None:
        if pulled.till <= stored and not pulled.upsert and not pulled.delete:
            return
        change = Change(
            source=SOURCE,
            kind=kind,
            upsert=pulled.upsert,
            delete=pulled.delete,
            source_version=pulled.till if pulled.till > stored else None,
            item_versions=pulled.versions,
            actor=SOURCE,
        )
        result = await self.store.apply(change)
        if result.status == "stale":
            log.info("Split %s at %d already stored (%s)", kind, pulled.till, result.stored_source_version)
        elif result.changed:  # a count: a big change would otherwise log thousands of names
            log.info("Split %s: %d changed (store version %d)", kind, len(result.changed), result.version)

    async def _sync_segments(self) -> None:
        raw = self.store.snapshot.raw
        texts = [*raw.items(SOURCE, "flags").values(), *raw.items(SOURCE, "rbsegments").values()]
        stored_members = raw.items(SOURCE, "segments")
        stored_tills = raw.item_versions.get(SOURCE, {}).get("segments", {})
        for name in sorted(referenced_segments(texts)):
            since = stored_tills.get(name, -1)
            members: set[str] = set(json.loads(stored_members[name])) if name in stored_members else set()
            till = since
            for _ in range(self.settings.max_pages):
                body = await self._segment_changes(name, till)
                added, removed = body.get("added"), body.get("removed")
                if not isinstance(added, list) or not isinstance(removed, list):
                    raise SplitApiError(f"segmentChanges/{name} has no added/removed lists")
                members |= {k for k in added if isinstance(k, str)}
                members -= {k for k in removed if isinstance(k, str)}
                page_since, page_till = _int(body.get("since"), "since"), _int(body.get("till"), "till")
                till = max(till, page_till)
                if page_since == page_till:
                    break
            else:
                pages = self.settings.max_pages
                raise SplitApiError(f"segmentChanges/{name} did not settle within {pages} pages")
            if till > since:
                change = Change(
                    source=SOURCE,
                    kind="segments",
                    upsert={name: json.dumps(sorted(members), separators=(",", ":"))},
                    item_versions={name: till},
                    actor=SOURCE,
                )
                await self.store.apply(change)

    async def _segment_changes(self, name: str, since: int) -> dict[str, Any]:
        status, raw = await self._get(f"/segmentChanges/{name}", {"since": since})
        if status != 200:
            raise SplitApiError(f"segmentChanges/{name} answered HTTP {status}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise SplitApiError(f"segmentChanges/{name} answered something that is not JSON") from None
        if not isinstance(body, dict):
            raise SplitApiError(f"segmentChanges/{name} body is not a JSON object")
        return body
