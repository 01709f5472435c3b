"""Unleash features, evaluated as Unleash's Python SDK (``UnleashClient`` 6.9.1) evaluates them (the few
deliberate differences are listed in docs/unleash.md).

Definitions come from a ``/api/client/features`` body (``{"version", "features", "segments"}``) or
a delta body (``{"events": [...]}``). The SDK evaluates in its bundled engine, Yggdrasil, which
rewrites strategies into a small rule language and parses it; this package does the same
(``rules`` → ``grammar`` → ``fragments``), so the engine's quirks — a constraint's value shape
choosing its comparison, a value that breaks the grammar turning the whole feature off — come out
the same. ``evaluator`` adds what the engine does around the rules: disabled features,
dependencies, strategy and feature variants (weights, overrides, stickiness, payloads).

Stored formats (``compile_source("unleash", kinds, cache)``, one JSON text per item):

- ``flags``: ``{feature name: the raw feature object}`` (as in ``features[]``);
- ``segments``: ``{segment id as text: the raw segment object}`` (as in ``segments[]``).

Problems are keyed by feature name, or ``"segments:<id>"``.

Modules: ``values`` (the engine's number, date, version and IP readers), ``hashing``, ``rules``,
``grammar``, ``fragments``, ``context`` (the SDK's context enrichment; request → context),
``documents`` (bodies and item shapes), ``evaluator`` (features → flags), ``offline`` (the
``flagproxy eval`` output), ``settings``, ``sync`` (the pull from Unleash's client API) and
``webhook`` (Unleash's webhook integration, which triggers a pull).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.engine import Flag, FlagError
from proxy.sources.base import Compiled, Sync, SyncContext
from proxy.sources.stored import compile_on_change, parsed
from proxy.sources.unleash.context import CONTEXT_KEY, UnleashContext, from_request, from_sdk_context
from proxy.sources.unleash.documents import parse_features
from proxy.sources.unleash.evaluator import (
    Feature,
    RequestDefaults,
    UnleashServed,
    compile_features,
    standard_reason,
)
from proxy.sources.unleash.settings import UnleashSettings

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from proxy.config import Settings
    from proxy.control.index import Endpoint

__all__ = [
    "CONTEXT_KEY",
    "Feature",
    "RequestDefaults",
    "UnleashContext",
    "UnleashServed",
    "UnleashSettings",
    "UnleashSource",
    "compile_features",
    "compile_items",
    "from_request",
    "from_sdk_context",
    "load_file",
    "parse_features",
    "standard_reason",
]


def load_file(path: str | Path, defaults: RequestDefaults | None = None) -> dict[str, Flag]:
    """A features (or delta) JSON file → flags; raises FlagError on a malformed file or item."""
    try:
        document = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FlagError(str(path), f"invalid JSON: {exc}") from None
    features, segments = parse_features(document)
    problems: dict[str, str] = {}
    flags, _ = compile_features(features, segments, problems, defaults)
    if problems:
        name, message = next(iter(problems.items()))
        raise FlagError(name, message)
    return flags


def compile_items(
    kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any], defaults: RequestDefaults | None = None
) -> Compiled:
    """Stored Unleash items (see the module docstring) → (flags, problems); recompiled only on change."""

    def build(problems: dict[str, str]) -> dict[str, Flag]:
        features, segments = parsed(kinds, "flags", problems), parsed(kinds, "segments", problems)
        return compile_features(features, segments, problems, defaults)[0]

    return compile_on_change(kinds, cache, build)


class UnleashSource:
    """Unleash features: pulled from Unleash's client API (``[unleash] api_url``), or a features file."""

    name: str = "unleash"
    kinds: tuple[str, ...] = ("flags", "segments")
    settings_type: type | None = UnleashSettings

    def __init__(self) -> None:
        # appName/environment for requests without them; set from [unleash] when the sync is built
        self.defaults = RequestDefaults()

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        return compile_items(kinds, cache, self.defaults)

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        return load_file(path, self.defaults)

    def sync(self, context: SyncContext) -> Sync | None:
        from proxy.sources.unleash.sync import UnleashSync  # the HTTP client only where the proxy runs

        settings = context.section or UnleashSettings()
        self.defaults.app_name = settings.app_name
        self.defaults.environment = settings.environment
        return UnleashSync(settings, context.store, metrics=context.metrics)

    def webhook_routes(self) -> list[BaseRoute]:
        from proxy.sources.unleash.webhook import ROUTES

        return list(ROUTES)

    def webhook_endpoints(self, settings: Settings) -> list[Endpoint]:
        from proxy.control.index import Endpoint

        section = settings.section(self.name)
        on = bool(getattr(section, "webhook_token", ""))
        what = "Unleash's change events (a pull follows)"
        auth = "Authorization: <webhook token>"
        return [Endpoint("/webhooks/unleash", what, on, "[unleash] webhook_token", auth, ("POST",))]

    def evaluate_lines(self, flags: Mapping[str, Flag], lines: Iterable[str]) -> Iterator[str]:
        """``flagproxy eval --keys-file``: an Unleash context object a line → the SDK's answers."""
        from proxy.sources.unleash.offline import evaluate_lines

        return evaluate_lines(flags, lines)
