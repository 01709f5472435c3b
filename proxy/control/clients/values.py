"""An engine outcome as the client flags API serves it: value, variant, reason, metadata.

- **value**: boolean flags → ``true``/``false``; a variant (native) or treatment (Split) with a
  config → that config (the parsed JSON); without one → the variant or treatment name.
- **variant**: always present: the variant or treatment name, ``"true"``/``"false"`` for booleans.
- **reason**: one of OpenFeature's standard reasons. The engine's own explanations map as in
  ``NATIVE_REASONS``; a kill is ``DISABLED`` and a promotion ``STATIC``; a source with its own words
  maps them itself (``Flag.reason_of``: Split's labels, in ``proxy.sources.split.evaluator``).
- **metadata**: flat: ``flagReason`` (the engine's or source's own word: ``rule``, ``split``, a Split
  label, ...) and the explanation's other scalar details (``rule`` index, ``changeNumber``), but not
  the unit's bucket: a unit's answer is then one of a few per flag, each encoded once (``Encoded``).
"""

from __future__ import annotations

import json
from typing import Any

from proxy.engine import Context, Flag, Served, variant_name

PER_UNIT = frozenset({"reason", "bucket"})  # not metadata (the reason is mapped; buckets are per unit)
MAX_ENCODED = 50_000  # distinct answers remembered per view (a source's error texts could vary)

STANDARD_REASONS = frozenset(
    {"STATIC", "DEFAULT", "TARGETING_MATCH", "SPLIT", "CACHED", "DISABLED", "UNKNOWN", "STALE", "ERROR"}
)
NATIVE_REASONS = {
    "disabled": "DISABLED",  # "enabled": false: everyone gets the default
    "rule": "TARGETING_MATCH",  # a targeting rule matched
    "split": "SPLIT",  # the fallthrough's percentage split bucketed the unit
    "fallthrough": "STATIC",  # no rule decided: the fallthrough's one outcome
    "default": "DEFAULT",  # nothing to bucket by (no key, or no bucketBy attribute)
    "killed": "DISABLED",  # the admin API's kill
    "promoted": "STATIC",  # the admin API's promotion
}


def client_value(served: Served) -> Any:
    value = served.value
    if value.__class__ is bool or not served.has_config:
        return value
    return served.config


def standard_reason(flag: Flag, why: dict[str, Any]) -> str:
    own = why.get("reason")
    if flag.overridden is None and flag.reason_of is not None:
        reason = flag.reason_of(why)
    else:
        reason = NATIVE_REASONS.get(own, "UNKNOWN") if isinstance(own, str) else "UNKNOWN"
    return reason if reason in STANDARD_REASONS else "UNKNOWN"


def metadata_of(why: dict[str, Any]) -> dict[str, Any]:
    own = why.get("reason")
    metadata: dict[str, Any] = {"flagReason": own} if own.__class__ is str else {}
    for name, value in why.items():
        if name not in PER_UNIT and value.__class__ in (str, int, float, bool):
            metadata[name] = value
    return metadata


def success(flag: Flag, served: Served, why: dict[str, Any]) -> dict[str, Any]:
    """OFREP's success body: key, value, variant, reason, metadata."""
    return {
        "key": flag.key,
        "value": client_value(served),
        "variant": variant_name(served.value),
        "reason": standard_reason(flag, why),
        "metadata": metadata_of(why),
    }


def evaluation(flag: Flag, context: Context) -> tuple[Served, dict[str, Any]]:
    """What was served to ``context`` and OFREP's success body for it."""
    served, why = flag.explain(context)
    return served, success(flag, served, why)


def _encode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _outcome(flag: Flag, served: Served) -> tuple[Any, ...]:
    """What identifies an answer (by content: an outcome object may be built per call)."""
    return flag.key, served.value.__class__, served.value, served.config_json


class Encoded:
    """Each answer a view gives, JSON-encoded once: OFREP items and the compact call's entries."""

    def __init__(self) -> None:
        self.items: dict[tuple[Any, ...], tuple[str, str, Any]] = {}
        self.entries: dict[tuple[Any, ...], tuple[str, str]] = {}

    def item(self, flag: Flag, context: Context) -> tuple[Served, str, str, dict[str, Any]]:
        """(served, the OFREP item's JSON, its reason, its metadata)."""
        served, why = flag.explain(context)
        why.pop("bucket", None)  # a fresh dict per call; the unit's bucket is not part of the answer
        value = served.value
        cache_key: tuple[Any, ...] | None = (
            flag.key,
            value.__class__,
            value,
            served.config_json,
            *why.items(),
        )
        try:
            found = self.items.get(cache_key)  # type: ignore[arg-type]
        except TypeError:  # an explanation holding a list or an object (a source's raw data)
            found = cache_key = None
        if found is None:
            body = success(flag, served, why)
            found = (_encode(body), body["reason"], body["metadata"])
            if cache_key is not None and len(self.items) < MAX_ENCODED:
                self.items[cache_key] = found
        return served, *found

    def entry(self, flag: Flag, served: Served) -> tuple[str, str]:
        """The compact call's ``"key":value`` and ``"key":"variant"``."""
        cache_key = _outcome(flag, served)
        found = self.entries.get(cache_key)
        if found is None:
            key = _encode(flag.key)
            found = (f"{key}:{_encode(client_value(served))}", f"{key}:{_encode(variant_name(served.value))}")
            if len(self.entries) < MAX_ENCODED:
                self.entries[cache_key] = found
        return found
