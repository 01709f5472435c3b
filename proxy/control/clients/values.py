"""An engine outcome as the client flags API serves it: value, variant, reason, metadata.

- **value**: boolean flags → ``true``/``false``; a variant (native) or treatment (Split) with a
  config → that config (the parsed JSON); without one → the variant or treatment name.
- **variant**: always present: the variant or treatment name, ``"true"``/``"false"`` for booleans.
- **reason**: one of OpenFeature's standard reasons. The engine's own explanations map as in
  ``NATIVE_REASONS``; a kill is ``DISABLED`` and a promotion ``STATIC``; a source with its own words
  maps them itself (``Flag.reason_of``: Split's labels, in ``proxy.sources.split.evaluator``).
- **metadata**: flat: ``flagReason`` (the engine's or source's own word: ``rule``, ``split``, a Split
  label, ...) and the explanation's other scalar details (``rule`` index, ``bucket``, ``changeNumber``).
"""

from __future__ import annotations

from typing import Any

from proxy.engine import Context, Flag, Served

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


def variant_of(served: Served) -> str:
    value = served.value
    if value.__class__ is bool:
        return "true" if value else "false"
    return value  # type: ignore[return-value]


def standard_reason(flag: Flag, why: dict[str, Any]) -> str:
    own = why.get("reason")
    if flag.overridden is None and flag.reason_of is not None:
        reason = flag.reason_of(why)
    else:
        reason = NATIVE_REASONS.get(own, "UNKNOWN") if isinstance(own, str) else "UNKNOWN"
    return reason if reason in STANDARD_REASONS else "UNKNOWN"


def metadata_of(why: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for name, value in why.items():
        if value.__class__ in (str, int, float, bool):
            metadata["flagReason" if name == "reason" else name] = value
    return metadata


def evaluation(flag: Flag, context: Context) -> tuple[Served, dict[str, Any]]:
    """OFREP's success body for ``flag`` (key, value, variant, reason, metadata) and what was served."""
    served, why = flag.explain(context)
    body = {
        "key": flag.key,
        "value": client_value(served),
        "variant": variant_of(served),
        "reason": standard_reason(flag, why),
        "metadata": metadata_of(why),
    }
    return served, body
