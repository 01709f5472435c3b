"""What Split's SDK would record for an exposure or a conversion, and the bodies it would post.

Pure functions and in-memory state, no I/O (``analytics`` queues, schedules and sends). Semantics are
splitio-client 10.7.0's (``engine/impressions``, ``api/impressions.py``, ``api/events.py``,
``client/input_validator.py``), with the one difference described at ``ImpressionTracker``.

- ``impression_of``: an exposure (flag, served outcome, evaluation context, time) → the impression
  the SDK's ``get_treatment`` would have built: the matching key, the bucketing key only when one was
  given, the treatment, the label (re-evaluated with ``flag.explain``), the change number, the time.
  None where the SDK records nothing: an invalid key, and ``definition not found``.
- ``ImpressionTracker``: the SDK's strategies. OPTIMIZED remembers a hash of
  ``key:feature:treatment:label:changeNumber`` (MurmurHash3 x64 128, first 64 bits, seed 0) in an LRU
  of ``impressions_dedup_keys`` entries, sets ``pt`` (the previous time) and queues an impression
  only when it is new or ``pt`` lies in an earlier hour; every repeat is counted per (flag, hour).
  DEBUG queues everything (``pt`` set too). NONE, and any flag with ``impressionsDisabled``, queues
  nothing: it counts, and tracks the unique keys per flag.
- ``impressions_payload``, ``counts_payload``, ``unique_keys_payloads``: the JSON bodies of
  ``testImpressions/bulk``, ``testImpressions/count`` and ``v1/keys/ss``.
- ``event_of``: ``track()``'s validation and the ``events/bulk`` item.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import mmh3

from proxy.engine import Flag, Served
from proxy.sources.split.evaluator import LABEL_EXCEPTION, LABEL_NOT_FOUND, MAX_KEY_LENGTH, _keys

HOUR_MS = 3_600_000
UNKNOWN = "UNKNOWN"  # the SDK's stand-in for an empty field in the de-duplication hash
UNIQUE_KEYS_BULK = 5000  # keys per v1/keys/ss body (the SDK's _UNIQUE_KEYS_MAX_BULK_SIZE)
UNIQUE_KEYS_CACHE = 30000  # keys tracked before the SDK flushes them early (_UNIQUE_KEYS_CACHE_SIZE)

EVENT_TYPE = re.compile(r"[a-zA-Z0-9][-_.:a-zA-Z0-9]{0,79}")  # the SDK's EVENT_TYPE_PATTERN, whole
MAX_PROPERTIES_BYTES = 32768
MAX_PROPERTIES = 300  # the SDK only warns above it (Split trims the rest)
EVENT_BASE_BYTES = 1024  # the SDK's size estimate of an event without properties


def hour_of(ms: int) -> int:
    """The start of the hour ``ms`` falls in (the SDK's ``truncate_time``)."""
    return ms - ms % HOUR_MS


@dataclass(slots=True)
class Impression:
    key: str  # matching key
    feature: str
    treatment: str
    label: str | None
    change_number: int | None
    bucketing_key: str | None  # only when the caller gave one (else null, as the SDK sends it)
    time: int  # ms
    previous_time: int | None = None  # OPTIMIZED and DEBUG: the last time this impression was seen


def _change_number(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 0  # a definition without one (only hand-written files): the localhost SDK's default


def impression_of(
    flag: Flag, served: Served, context: Mapping[str, Any], at_ms: int
) -> tuple[Impression, bool] | None:
    """The impression the SDK would record for ``flag`` serving ``served`` to ``context``, and
    whether the flag has impressions disabled; None where the SDK records none.

    Re-evaluates with ``flag.explain`` for the label: call it off the request path.
    """
    if flag.source != "split" or not isinstance(served.value, str):
        return None
    keys = _keys(context)
    if keys is None:
        return None  # invalid key: the SDK answers control without an impression
    _, why = flag.explain(context)
    label = why.get("reason")
    if label == LABEL_NOT_FOUND:
        return None
    definition = flag.definition
    if label == LABEL_EXCEPTION:  # the SDK's failed-evaluation result: no change number, not disabled
        change_number, disabled = None, False
    else:
        change_number = _change_number(why.get("changeNumber", definition.get("changeNumber")))
        disabled = bool(definition.get("impressionsDisabled"))
    matching, bucketing = keys
    impression = Impression(
        key=matching,
        feature=flag.key,
        treatment=served.value,
        label=label if isinstance(label, str) else None,
        change_number=change_number,
        bucketing_key=bucketing if context.get("bucketingKey") is not None else None,
        time=at_ms,
    )
    return impression, disabled


def impression_hash(impression: Impression) -> int:
    """The SDK's de-duplication hash: MurmurHash3 x64 128 (seed 0), its first 64 bits, unsigned."""
    fields = (
        impression.key or UNKNOWN,
        impression.feature or UNKNOWN,
        impression.treatment or UNKNOWN,
        impression.label or UNKNOWN,
        str(int(impression.change_number or 0)),
    )
    text = ":".join(fields)
    return int(mmh3.hash64(text.encode("utf-8", "surrogatepass"), 0, True, False)[0])


class ImpressionTracker:
    """The SDK's impression strategies (see the module docstring) with their counts and unique keys.

    As in the Python SDK, its LRU keeps the *first* time an impression was seen, so once an hour has
    passed every repeat is sent (and ``pt`` never moves); a repeat is queued when that first sighting
    was in an earlier hour than the impression's own time.
    """

    def __init__(self, mode: str, dedup_keys: int) -> None:
        self.mode = mode
        self._size = dedup_keys
        self._seen: OrderedDict[int, int] = OrderedDict()
        self.counts: dict[tuple[str, int], int] = {}
        self._unique: dict[str, dict[str, None]] = {}  # flag → keys since the last flush (ordered)
        self._unique_seen: set[tuple[str, str]] = set()  # since the last filter reset (24 h)
        self.unique_pending = 0

    def track(self, impression: Impression, disabled: bool) -> Impression | None:
        """The impression to send (``pt`` set), or None when it is only counted or de-duplicated."""
        if disabled or self.mode == "none":
            self._count(impression)
            self._track_key(impression.feature, impression.key)
            return None
        impression.previous_time = previous = self._observe(impression)
        if self.mode == "debug":
            return impression
        if previous is None:
            return impression
        self._count(impression)
        return impression if previous < hour_of(impression.time) else None

    def _observe(self, impression: Impression) -> int | None:
        # as splitio-client 10.7.0's LRU: the FIRST sighting is kept (a hit only refreshes its place),
        # so from the next hour on every repeat is sent, with that first time as ``pt``
        seen = self._seen
        digest = impression_hash(impression)
        previous = seen.get(digest)
        if previous is None:
            seen[digest] = impression.time
        seen.move_to_end(digest)
        if len(seen) > self._size:
            seen.popitem(last=False)
        return previous

    def _count(self, impression: Impression) -> None:
        slot = (impression.feature, hour_of(impression.time))
        self.counts[slot] = self.counts.get(slot, 0) + 1

    def _track_key(self, feature: str, key: str) -> None:
        seen = self._unique_seen
        if (feature, key) in seen:
            return
        if len(seen) >= self._size:
            seen.clear()  # bounded: a key may then be reported again, which Split tolerates
        seen.add((feature, key))
        self._unique.setdefault(feature, {})[key] = None
        self.unique_pending += 1

    def pop_counts(self) -> dict[tuple[str, int], int]:
        counts, self.counts = self.counts, {}
        return counts

    def pop_unique_keys(self) -> dict[str, list[str]]:
        unique, self._unique = self._unique, {}
        self.unique_pending = 0
        return {feature: list(keys) for feature, keys in unique.items()}

    def forget_unique_keys(self) -> None:
        """The SDK's daily filter reset: keys seen before are reported again."""
        self._unique_seen.clear()


def impressions_payload(impressions: Iterable[Impression]) -> list[dict[str, Any]]:
    """``testImpressions/bulk``: one ``{"f", "i"}`` per flag, flags in name order, impressions in
    the order they were recorded."""
    by_feature: dict[str, list[dict[str, Any]]] = {}
    for imp in impressions:
        by_feature.setdefault(imp.feature, []).append(
            {
                "k": imp.key,
                "t": imp.treatment,
                "m": imp.time,
                "c": imp.change_number,
                "r": imp.label,
                "b": imp.bucketing_key,
                "pt": imp.previous_time,
            }
        )
    return [{"f": feature, "i": by_feature[feature]} for feature in sorted(by_feature)]


def counts_payload(counts: Mapping[tuple[str, int], int]) -> dict[str, Any]:
    """``testImpressions/count``: repeats per flag and hour."""
    return {"pf": [{"f": feature, "m": hour, "rc": n} for (feature, hour), n in counts.items()]}


def unique_keys_payloads(
    unique: Mapping[str, list[str]], bulk: int = UNIQUE_KEYS_BULK
) -> list[dict[str, Any]]:
    """``v1/keys/ss`` bodies of at most ``bulk`` keys each (a flag's keys may span bodies)."""
    bodies: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    room = bulk
    for feature, keys in unique.items():
        start = 0
        while start < len(keys):
            part = keys[start : start + room]
            entries.append({"f": feature, "ks": part})
            start += len(part)
            room -= len(part)
            if room == 0:
                bodies.append({"keys": entries})
                entries, room = [], bulk
    if entries:
        bodies.append({"keys": entries})
    return bodies


# --- events ----------------------------------------------------------------------------------------


class InvalidEvent(ValueError):
    """A conversion the SDK's ``track()`` would refuse; the message says why (never the key)."""


def _track_key(key: Any) -> str:
    if isinstance(key, str):
        text = key
    elif isinstance(key, bool) or not isinstance(key, numbers.Number):
        raise InvalidEvent("the key is not a string")
    else:
        try:
            finite = math.isfinite(key)  # type: ignore[arg-type]
        except TypeError:
            finite = False
        if not finite:
            raise InvalidEvent("the key is not a finite number")
        text = str(key)
    if not text.strip():
        raise InvalidEvent("the key is empty")
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidEvent(f"the key is longer than {MAX_KEY_LENGTH} characters")
    return text


def _properties(properties: Any) -> tuple[dict[str, Any] | None, int, bool]:
    """(properties as sent, the SDK's size estimate, more than MAX_PROPERTIES of them)."""
    size = EVENT_BASE_BYTES
    if properties is None:
        return None, size, False
    if not isinstance(properties, Mapping):
        raise InvalidEvent("properties must be an object")
    kept: dict[str, Any] = {}
    for name, element in properties.items():
        if not isinstance(name, str):
            continue  # the SDK leaves out non-string names
        kept[name] = None
        size += len(name)
        if element is None:
            continue  # (the SDK checks the size only after a property with a value)
        if not isinstance(element, str | numbers.Number) or (
            isinstance(element, float) and not math.isfinite(element)
        ):
            element = None  # other types are sent as null; so is NaN or infinity (no JSON for them)
        kept[name] = element
        if isinstance(element, str):
            size += len(element)
        if size > MAX_PROPERTIES_BYTES:
            raise InvalidEvent(f"properties exceed {MAX_PROPERTIES_BYTES} bytes")
    return (kept or None), size, len(kept) > MAX_PROPERTIES


def event_of(
    key: Any, event: Any, value: Any, at_ms: int, properties: Any, traffic_type: str
) -> tuple[dict[str, Any], int, bool]:
    """The ``events/bulk`` item ``track()`` would queue, its size estimate, and whether it has more
    than 300 properties (the SDK warns and sends them). Raises InvalidEvent where ``track()``
    returns False; also for a value that is NaN or infinite, which has no JSON form."""
    key = _track_key(key)
    if not isinstance(event, str) or EVENT_TYPE.fullmatch(event) is None:
        raise InvalidEvent(
            "the event name must be 1-80 letters, digits, '-', '_', '.' or ':', starting with a letter "
            "or digit"
        )
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidEvent("the value must be a number")
        if not math.isfinite(value):
            raise InvalidEvent("the value must be a finite number")
    kept, size, many = _properties(properties)
    item = {
        "key": key,
        "trafficTypeName": traffic_type,
        "eventTypeId": event,
        "value": value,
        "timestamp": at_ms,
        "properties": kept,
    }
    return item, size, many
