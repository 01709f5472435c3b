"""Unleash sync: pull ``GET {api_url}/api/client/features`` into the store, as Unleash's SDKs poll.

Pulls run at start, every ``[unleash] interval_s`` and when the webhook fires (a burst of triggers
during a pull becomes one more pull). Each sends the client token and the SDK identification
headers (``UNLEASH-APPNAME``, ``UNLEASH-INSTANCEID``, ``UNLEASH-CONNECTION-ID``, ``UNLEASH-SDK``,
``Unleash-Client-Spec``) and ``If-None-Match`` with the last ETag: ``304`` means nothing to do.

A body is written whole — segments first, then features, each kind replaced — with the server's
revision (``meta.revisionId``, else the number in an ETag such as ``"76d8bb0e:123"``) as the source
version, so the store's ordering rules keep an older pull (another instance's, or a slow one) from
undoing a newer one. A failing, slow or garbled API keeps the last good definitions: every try is
counted, the outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from proxy.engine import FlagError
from proxy.metrics import Metrics
from proxy.sources.pulling import BodyTooLarge, PeriodicPull, read_limited
from proxy.sources.unleash.documents import parse_features
from proxy.sources.unleash.settings import UnleashSettings
from proxy.store.change import Change, stored_text

if TYPE_CHECKING:
    from proxy.store.base import FlagStore

log = logging.getLogger("flagproxy.unleash")

SOURCE = "unleash"
SDK_NAME = "flagproxy"
CLIENT_SPEC_VERSION = "6.1.0"


class UnleashApiError(Exception):
    """The Unleash API failed, was too slow, or answered something that is not a features body."""


def revision(document: Any, etag: str) -> int | None:
    """The server's revision of a features body: ``meta.revisionId``, else the ETag's ``:<n>``."""
    meta = document.get("meta") if isinstance(document, dict) else None
    value = meta.get("revisionId") if isinstance(meta, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    tail = etag.strip().removeprefix("W/").strip('"').rpartition(":")[2]
    return int(tail) if tail.isascii() and tail.isdigit() else None


class UnleashSync(PeriodicPull):
    source = SOURCE

    def __init__(
        self,
        settings: UnleashSettings,
        store: FlagStore,
        client: httpx.AsyncClient | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(settings.interval_s, settings.timeout_s, client, metrics)
        self.settings = settings
        self.store = store
        self._etag = ""
        self._failing = False
        self.connection_id = str(uuid.uuid4())
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def enabled(self) -> bool:
        return bool(self.settings.api_url and self.settings.token)

    def failed(self, exc: Exception) -> None:
        """Logged once per outage (every try is counted)."""
        if not self._failing:
            log.error("Unleash sync failing (the last good features are kept): %s", exc)
        self._failing = True

    def succeeded(self) -> None:
        if self._failing:
            log.info("Unleash sync recovered")
        self._failing = False

    def headers(self) -> dict[str, str]:
        headers = {
            "Authorization": self.settings.token,
            "Accept": "application/json",
            "Unleash-Client-Spec": CLIENT_SPEC_VERSION,
            "UNLEASH-APPNAME": self.settings.app_name,
            "UNLEASH-INSTANCEID": self.instance_id,
            "UNLEASH-CONNECTION-ID": self.connection_id,
            "UNLEASH-SDK": f"{SDK_NAME}:{_version()}",
            "UNLEASH-INTERVAL": str(int(self.settings.interval_s * 1000)),
        }
        if self._etag:
            headers["If-None-Match"] = self._etag
        return headers

    async def _get(self) -> tuple[int, bytes, str]:
        """(status, body read up to ``max_response_bytes``, ETag)."""
        url = self.settings.api_url.rstrip("/") + "/api/client/features"
        limit = self.settings.max_response_bytes
        try:
            async with self.client.stream("GET", url, headers=self.headers()) as response:
                etag = response.headers.get("etag", "")
                if response.status_code != 200:
                    return response.status_code, b"", etag
                return 200, await read_limited(response, limit), etag
        except BodyTooLarge as exc:
            raise UnleashApiError(f"the features body exceeds [unleash] max_response_bytes ({exc})") from None
        except httpx.HTTPError as exc:
            raise UnleashApiError(f"GET /api/client/features: {type(exc).__name__}: {exc}") from None

    async def sync_once(self) -> None:
        async with self._lock:
            status, body, etag = await self._get()
            if status == 304:
                self.metrics.source_synced(SOURCE, ok=True)
                return
            if status != 200:
                raise UnleashApiError(f"GET /api/client/features answered HTTP {status}")
            try:
                document = json.loads(body)
                features, segments = parse_features(document)
            except (ValueError, UnicodeDecodeError) as exc:  # FlagError included
                detail = exc.message if isinstance(exc, FlagError) else "not JSON"
                raise UnleashApiError(f"GET /api/client/features answered a garbled body: {detail}") from None
            version = revision(document, etag)
            for kind, items in (("segments", segments), ("flags", features)):
                await self._write(kind, {key: stored_text(raw) for key, raw in items.items()}, version)
            self._etag = etag
            self.metrics.source_synced(SOURCE, ok=True)

    async def _write(self, kind: str, items: dict[str, str], version: int | None) -> None:
        change = Change(
            source=SOURCE, kind=kind, upsert=items, replace=True, source_version=version, actor=SOURCE
        )
        result = await self.store.apply(change)
        if result.status == "stale":
            log.info(
                "Unleash %s at revision %s already stored (%s)", kind, version, result.stored_source_version
            )
        elif result.status == "version_required":
            raise UnleashApiError(
                "the features body carries no revision, and a revision is stored: "
                f"{result.stored_source_version}"
            )
        elif result.changed:
            log.info("Unleash %s: %d changed (store version %d)", kind, len(result.changed), result.version)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flagproxy")
    except PackageNotFoundError:
        return "0"
