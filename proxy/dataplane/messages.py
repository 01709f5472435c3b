"""A client's request head as parsed off the wire, shared by the client side and what serves it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class RequestHead:
    method: bytes
    target: bytes  # the request target as received, byte for byte
    raw_path: bytes  # its path part (origin-form), as received
    query: bytes | None  # after the first "?"; None when there is no "?"
    path: str  # decoded, normalised (``paths.normalise``): what routing and flag routes see
    version: bytes  # b"1.0" or b"1.1"
    headers: list[tuple[bytes, bytes]]  # names in the client's spelling, in its order
    lowered: list[bytes]  # the names in lower case
    client: tuple[str, int] | None
    keep_alive: bool  # the client wants the connection kept after this exchange
    chunked: bool  # the request body is chunked
    has_body: bool  # a body follows the head
    length: int = 0  # its Content-Length (0 when chunked or absent)
    upgrade: bytes | None = None  # the protocol an Upgrade request asks for
    expect_continue: bool = False
    scope: dict[str, Any] = field(default_factory=dict)  # the ASGI-shaped view the resolver reads

    @property
    def client_ip(self) -> str | None:
        return self.client[0] if self.client else None
