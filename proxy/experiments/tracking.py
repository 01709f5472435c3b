"""``POST /api/track`` bodies: conversions sent by origins and clients, validated as a whole.

One event ``{"key", "event", "value"?, "timestamp"?, "properties"?}`` or ``{"events": [...]}``. A body
with any bad event is refused whole (nothing is recorded), naming the first problem's field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

EVENT_FIELDS = frozenset({"key", "event", "value", "timestamp", "properties"})
MAX_KEY_LENGTH = 1024
MAX_EVENT_LENGTH = 128
MAX_PROPERTIES = 300
FUTURE_SKEW_S = 300.0  # a timestamp further ahead than this is refused (clocks drift; not by hours)


class TrackError(ValueError):
    """A refused body: ``status`` (400, 413, 422), an error code and the field at fault."""

    def __init__(self, status: int, error: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.error, self.field = status, error, field


@dataclass(frozen=True, slots=True)
class Tracked:
    key: str
    event: str
    at: float  # Unix seconds
    value: float | None = None
    properties: Mapping[str, Any] | None = None


def _at(where: str, name: str) -> str:
    """The field's name in messages: ``key`` for a single event, ``events[3].key`` in a batch."""
    return f"{where}.{name}" if where else name


def _text(where: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise TrackError(422, "invalid_event", where, "expected a non-empty string")
    if len(value) > limit:
        raise TrackError(422, "invalid_event", where, f"longer than {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise TrackError(422, "invalid_event", where, "must not contain control characters")
    return value


def _timestamp(where: str, value: Any, now: float) -> float:
    if not isinstance(value, str):
        raise TrackError(422, "invalid_event", where, "expected an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TrackError(
            422, "invalid_event", where, f"{value[:64]!r} is not an ISO-8601 timestamp"
        ) from None
    if parsed.tzinfo is None:
        raise TrackError(422, "invalid_event", where, "a timestamp needs a time zone (Z or +hh:mm)")
    at = parsed.timestamp()
    if at > now + FUTURE_SKEW_S:
        raise TrackError(422, "invalid_event", where, "is in the future")
    return at


def parse_event(where: str, item: Any, now: float) -> Tracked:
    if not isinstance(item, dict):
        raise TrackError(422, "invalid_event", where, "expected an object with key and event")
    unknown = sorted(set(item) - EVENT_FIELDS)
    if unknown:
        raise TrackError(422, "invalid_event", _at(where, unknown[0]), "unknown field")
    key = _text(_at(where, "key"), item.get("key"), MAX_KEY_LENGTH)
    event = _text(_at(where, "event"), item.get("event"), MAX_EVENT_LENGTH)
    value = item.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrackError(422, "invalid_event", _at(where, "value"), "expected a finite number")
        try:  # a JSON integer is unbounded: past ~1.8e308 it has no float (OverflowError)
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise TrackError(422, "invalid_event", _at(where, "value"), "expected a finite number")
    at = now
    if item.get("timestamp") is not None:
        at = _timestamp(_at(where, "timestamp"), item["timestamp"], now)
    properties = item.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise TrackError(422, "invalid_event", _at(where, "properties"), "expected an object")
        if len(properties) > MAX_PROPERTIES:
            raise TrackError(
                422,
                "invalid_event",
                _at(where, "properties"),
                f"more than {MAX_PROPERTIES} properties",
            )
    return Tracked(key, event, at, value, properties)


def parse_track(body: Any, max_events: int, now: float) -> list[Tracked]:
    """A whole ``/api/track`` body → its events; ``TrackError`` for the first problem."""
    if not isinstance(body, dict):
        raise TrackError(400, "invalid_body", "", 'expected a JSON object: one event, or {"events": [...]}')
    if "events" not in body:
        return [parse_event("", body, now)]
    if set(body) != {"events"}:
        extra = sorted(set(body) - {"events"})[0]
        raise TrackError(422, "invalid_event", extra, 'a batch holds only "events"')
    events = body["events"]
    if not isinstance(events, list) or not events:
        raise TrackError(422, "invalid_event", "events", "expected a non-empty array of events")
    if len(events) > max_events:
        raise TrackError(
            413, "too_many_events", "events", f"{len(events)} events; at most {max_events} per request"
        )
    return [parse_event(f"events[{i}]", item, now) for i, item in enumerate(events)]
