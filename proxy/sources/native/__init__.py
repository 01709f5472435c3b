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


class NativeSource:
    name: str = document.SOURCE
    kinds: tuple[str, ...] = ("flags",)
    settings_type: type | None = None  # uses the shared [webhooks] section

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        return document.compile_items(kinds.get("flags", {}), cache)

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        return document.load_file(path)

    def sync(self, context: SyncContext) -> Sync | None:
        return None

    def webhook_routes(self) -> list[BaseRoute]:
        from proxy.sources.native.webhook import ROUTES  # Starlette only where the control plane runs

        return list(ROUTES)
