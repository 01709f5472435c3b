"""An OFREP request body as the engine's context: ``targetingKey`` is the unit key, the rest attributes.

The context is built with the data plane's own ``make_context``, so a unit is bucketed exactly as
when its requests carry the key header. Refusals are OFREP's 400 codes: a body that is not JSON, or
not an object → ``PARSE_ERROR``; ``context`` (or ``targetingKey``) of the wrong type, or too many
attributes → ``INVALID_CONTEXT``. A missing ``context`` is an empty one (clients send ``{}`` when the
application set none). ``key`` is not an attribute: it is the unit, and only ``targetingKey`` sets it.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.dataplane.context import make_context

MAX_ATTRIBUTES = 256
MAX_TARGETING_KEY = 1024
RESERVED = ("targetingKey", "key")


class ContextError(Exception):
    def __init__(self, error_code: str, detail: str) -> None:
        super().__init__(detail)
        self.error_code, self.detail = error_code, detail


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body, parse_constant=_no_constants)
        if b"\\u" in body:  # an escaped unpaired surrogate parses, but is no text
            json.dumps(document, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ContextError("PARSE_ERROR", "the body is nested too deeply") from None
    except (ValueError, UnicodeError) as exc:
        raise ContextError("PARSE_ERROR", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ContextError("PARSE_ERROR", 'the body must be a JSON object: {"context": {...}}')
    return document


def ofrep_context(body: bytes) -> tuple[dict[str, Any], bool]:
    """(the engine context, whether it has a unit key)."""
    context = parse_body(body).get("context")
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise ContextError("INVALID_CONTEXT", "context must be a JSON object")
    if len(context) > MAX_ATTRIBUTES:
        raise ContextError("INVALID_CONTEXT", f"context has more than {MAX_ATTRIBUTES} properties")
    unit = context.get("targetingKey")
    if unit is not None and not isinstance(unit, str):
        raise ContextError("INVALID_CONTEXT", "targetingKey must be a string")
    if unit is not None and len(unit) > MAX_TARGETING_KEY:
        raise ContextError("INVALID_CONTEXT", f"targetingKey is longer than {MAX_TARGETING_KEY} characters")
    attributes = {name: value for name, value in context.items() if name not in RESERVED}
    unit = unit or None
    return make_context(unit, attributes), unit is not None
