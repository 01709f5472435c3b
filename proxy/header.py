"""The flag headers forwarded to the origin: compact JSON, ASCII-only, one object each."""

from __future__ import annotations

from collections.abc import Iterable

from proxy.engine import Flag, Served

Header = tuple[bytes, bytes]


class FlagHeaders:
    """Encodes resolved flags into ``X-Feature-Flags`` and ``X-Feature-Flags-Config``."""

    def __init__(self, name: str = "X-Feature-Flags", config_name: str = "X-Feature-Flags-Config") -> None:
        self.name = name.lower().encode("latin-1")
        self.config_name = config_name.lower().encode("latin-1")
        # Client-supplied headers that the proxy owns: dropped before it adds its own.
        self.reserved_exact = frozenset({self.name, self.config_name})
        self.reserved_prefix = self.name + b"-"

    def is_reserved(self, name: bytes) -> bool:
        """``name`` must already be lower case (ASGI guarantees it)."""
        return name in self.reserved_exact or name.startswith(self.reserved_prefix)

    def encode(self, resolved: Iterable[tuple[Flag, Served]]) -> list[Header]:
        values = []
        configs = []
        for flag, served in resolved:
            values.append(f"{flag.key_json}:{served.value_json}")
            if served.config_json is not None:
                configs.append(f"{flag.key_json}:{served.config_json}")
        headers = [(self.name, ("{" + ",".join(values) + "}").encode("ascii"))]
        if configs:
            headers.append((self.config_name, ("{" + ",".join(configs) + "}").encode("ascii")))
        return headers
