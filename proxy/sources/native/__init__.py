"""flagproxy's own format (docs/flags.md): flags files, webhooks and the admin API write it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.engine import Flag
from proxy.sources.base import Compiled, Sync, SyncContext
from proxy.sources.native import document

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from proxy.config import Settings
    from proxy.control.index import Endpoint


class NativeSource:
    name: str = document.SOURCE
    kinds: tuple[str, ...] = ("flags",)
    settings_type: type | None = None  # uses the shared [webhooks] section

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        return document.compile_items(kinds.get("flags", {}), cache)

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        return document.load_file(path)

    def sync(self, context: SyncContext) -> Sync | None:
        """The flags file, when there is one: re-read on SIGHUP, and watched ([store] watch_flags_file)."""
        store = context.settings.store
        if not Path(store.flags_file).is_file():
            return None
        from proxy.sources.native.file_sync import FlagsFileSync

        return FlagsFileSync(store.flags_file, context.store, watch=store.watch_flags_file)

    def webhook_routes(self) -> list[BaseRoute]:
        from proxy.sources.native.webhook import ROUTES  # Starlette only where the control plane runs

        return list(ROUTES)

    def webhook_endpoints(self, settings: Settings) -> list[Endpoint]:
        from proxy.control.index import Endpoint

        on = bool(settings.webhooks.secret)
        what = "native flag documents and patches"
        with_ = "[webhooks] secret (FLAGPROXY_WEBHOOKS_SECRET)"
        return [
            Endpoint(
                "/webhooks/native", what, on, with_, "X-Flagproxy-Signature: t=,v1= (HMAC-SHA256)", ("POST",)
            )
        ]
