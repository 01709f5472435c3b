"""``flagproxy eval --source unleash --keys-file CONTEXTS.jsonl``: what the SDK would answer.

Each input line is an Unleash context object (``userId``, ``sessionId``, ``remoteAddress``,
``currentTime``, ``environment``, ``appName``, ``properties``; other keys are properties, as the SDK
moves them); each output line is ``{"key": <userId or null>, "flags": {name: {"enabled", "variant",
"payload"}}}`` for every feature, in name order, with the values ``UnleashClient.is_enabled`` and
``get_variant`` return (``variant`` is ``"disabled"`` when none resolves, ``payload`` null then).
Blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from proxy.engine import Flag
from proxy.sources.unleash.context import CONTEXT_KEY, ContextError, from_sdk_context
from proxy.sources.unleash.evaluator import UnleashServed


class ContextLineError(ValueError):
    """An input line that is not an Unleash context object; the message names the line."""


def answer(served: Any) -> dict[str, Any]:
    """One flag's outcome as the SDK reports it."""
    if isinstance(served, UnleashServed):
        payload = None if served.payload is None else dict(served.payload)
        return {"enabled": served.enabled, "variant": served.variant, "payload": payload}
    enabled = served.value is not False  # a flag of another source: its value read as on/off
    return {"enabled": enabled, "variant": "disabled", "payload": None}


def evaluate_lines(flags: Mapping[str, Flag], lines: Iterable[str]) -> Iterator[str]:
    ordered = [flags[name] for name in sorted(flags)]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ContextLineError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ContextLineError(f"line {number}: expected an Unleash context object")
        try:
            context = {CONTEXT_KEY: from_sdk_context(item)}
        except ContextError as exc:
            raise ContextLineError(f"line {number}: {exc}") from None
        results = {flag.key: answer(flag.evaluate(context)) for flag in ordered}
        yield json.dumps(
            {"key": item.get("userId"), "flags": results}, separators=(",", ":"), ensure_ascii=False
        )
