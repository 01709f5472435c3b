"""The one JSON error body every layer answers with: ``{"error": <code>, "detail": <what is wrong>}``.

The data plane, the control plane and the connection protocol all write it through here, so a client
sees one shape whichever layer refused it.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.asgi import Header, Send

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error_body(error: str, detail: str, **extra: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's JSONResponse writes every other control-plane body."""
    body = {"error": error, "detail": detail, **extra}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_headers(body: bytes, request_id: str = "") -> list[Header]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("ascii")))
    return headers


async def send_error(send: Send, status: int, error: str, detail: str, request_id: str = "") -> int:
    """An ASGI JSON error response; returns the body's size (for the access log)."""
    body = error_body(error, detail)
    await send({"type": "http.response.start", "status": status, "headers": error_headers(body, request_id)})
    await send({"type": "http.response.body", "body": body})
    return len(body)


def error_response_bytes(
    status: int, error: str, detail: str, request_id: str = "", close: bool = True
) -> bytes:
    """The same answer as raw HTTP/1.1 bytes (the data plane's own answers), by default closing the
    connection (after a framing error the byte stream cannot be trusted)."""
    body = error_body(error, detail)
    head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error"))
    for name, value in error_headers(body, request_id):
        head += name + b": " + value + b"\r\n"
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body
