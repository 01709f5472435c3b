"""Request context: who is calling and what we know about the request, for the engine."""

from __future__ import annotations

from typing import Any

from proxy.config import ContextSettings

Scope = dict[str, Any]
Header = tuple[bytes, bytes]


class ContextBuilder:
    """Turns an ASGI scope into the engine's context mapping (``key``, ``path``, ``method``, ...)."""

    def __init__(self, settings: ContextSettings) -> None:
        self.key_header = settings.key_header.lower().encode("latin-1")

    def build(self, scope: Scope) -> tuple[dict[str, Any], list[Header]]:
        """Return the context and any response headers the caller must get (e.g. a sticky cookie)."""
        context: dict[str, Any] = {"path": scope["path"], "method": scope["method"]}
        for name, value in scope["headers"]:
            if name == self.key_header:
                key = value.decode("latin-1").strip()
                if key:
                    context["key"] = key
                break
        return context, []
