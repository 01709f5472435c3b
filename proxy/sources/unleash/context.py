"""The Unleash context an evaluation reads, built as Unleash's Python SDK builds it.

``from_sdk_context`` is ``UnleashClient``'s enrichment of a caller's context object: a missing
``currentTime`` becomes now (UTC, ISO 8601), every value goes through Python's ``str()`` (so
``True`` reads ``"True"`` and ``null`` reads ``"None"``), and top-level keys other than the seven
standard fields count as properties (over a ``properties`` entry of the same name: the SDK moves
them into ``properties`` and its engine then reads the top-level copy again, checked by running it).

``from_request`` maps the proxy's request context onto it: ``userId`` is the caller's key, the
standard fields come from attributes of the same names when present (a header or cookie mapped to
a ``sessionId`` attribute by ``[context]``), ``appName``/``environment`` from ``[unleash]`` otherwise,
``currentTime`` is now, and every other attribute is a property.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

STANDARD_FIELDS = (
    "userId",
    "sessionId",
    "environment",
    "appName",
    "currentTime",
    "remoteAddress",
    "properties",
)
CONTEXT_KEY = "unleash.context"  # an engine context may carry a ready UnleashContext under this key
_NOT_PROPERTIES = frozenset({*STANDARD_FIELDS, "key", "bucketingKey", CONTEXT_KEY})


class ContextError(ValueError):
    pass


class UnleashContext:
    """What the engine's ``EnrichedContext`` holds (strings or None), less the toggle name."""

    __slots__ = (
        "app_name",
        "current_time",
        "environment",
        "properties",
        "remote_address",
        "session_id",
        "user_id",
    )

    def __init__(
        self,
        user_id: str | None = None,
        session_id: str | None = None,
        environment: str | None = None,
        app_name: str | None = None,
        current_time: str | None = None,
        remote_address: str | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        self.user_id = user_id
        self.session_id = session_id
        self.environment = environment
        self.app_name = app_name
        self.current_time = current_time
        self.remote_address = remote_address
        self.properties: Mapping[str, str] = properties or {}

    def field(self, context_name: str) -> str | None:
        """A standard field by its Unleash name, else the property of that name."""
        if context_name == "userId":
            return self.user_id
        if context_name == "sessionId":
            return self.session_id
        if context_name == "environment":
            return self.environment
        if context_name == "appName":
            return self.app_name
        if context_name == "currentTime":
            return self.current_time
        if context_name == "remoteAddress":
            return self.remote_address
        return self.properties.get(context_name)


def now_text() -> str:
    return datetime.now(UTC).isoformat()


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def from_sdk_context(context: Mapping[str, Any]) -> UnleashContext:
    """A caller's Unleash context object → what the SDK hands its engine."""
    properties = context.get("properties", {})
    if not isinstance(properties, Mapping):
        raise ContextError('"properties" must be an object')
    moved = dict(properties)
    moved.update((k, v) for k, v in context.items() if k not in STANDARD_FIELDS)

    def get(name: str) -> str | None:
        return _text(context[name]) if name in context else None

    current = get("currentTime")
    return UnleashContext(
        user_id=get("userId"),
        session_id=get("sessionId"),
        environment=get("environment"),
        app_name=get("appName"),
        current_time=now_text() if current is None else current,
        remote_address=get("remoteAddress"),
        properties={str(k): _text(v) for k, v in moved.items()},
    )


def from_request(
    ctx: Mapping[str, Any], app_name: str | None = None, environment: str | None = None
) -> UnleashContext:
    """The proxy's request context (``key`` + attributes) → an Unleash context."""
    ready = ctx.get(CONTEXT_KEY)
    if isinstance(ready, UnleashContext):
        return ready

    def get(name: str, default: str | None = None) -> str | None:
        value = ctx.get(name)
        return default if value is None else _text(value)

    key = ctx.get("key")
    return UnleashContext(
        user_id=None if key is None else _text(key),
        session_id=get("sessionId"),
        environment=get("environment", environment),
        app_name=get("appName", app_name),
        current_time=get("currentTime") or now_text(),
        remote_address=get("remoteAddress"),
        properties={k: _text(v) for k, v in ctx.items() if k not in _NOT_PROPERTIES and v is not None},
    )
