"""The client API's answers as plain ASGI messages (no Request or Response objects on the hot path)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from proxy.asgi import Header, Receive, Scope, Send
from proxy.errors import error_body

JSON = (b"content-type", b"application/json")


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def header(scope: Scope, name: bytes) -> str:
    """One request header (the first), decoded as Latin-1; "" when absent. ``name`` in lower case."""
    for key, value in scope["headers"]:
        if key == name or key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def query(scope: Scope) -> list[tuple[str, str]]:
    return parse_qsl(bytes(scope.get("query_string", b"")).decode("latin-1"), keep_blank_values=True)


GZIP_SUFFIX = '-gzip"'


def strong_etag(body: bytes) -> str:
    """A strong ETag: a hash of the (uncompressed) body, so it follows context-dependent values."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def gzip_etag(etag: str) -> str:
    """The gzip representation's own strong ETag (``"<hash>-gzip"``)."""
    return etag[:-1] + GZIP_SUFFIX


def _bare(tag: str) -> str:
    tag = tag.strip().removeprefix("W/")
    return tag[: -len(GZIP_SUFFIX)] + '"' if tag.endswith(GZIP_SUFFIX) else tag


def etag_matches(if_none_match: str, etag: str) -> bool:
    """``If-None-Match`` (a list, weak or strong, or ``*``) names ``etag``: the weak comparison of RFC
    9110, also across the gzip and identity representations of one body."""
    if not if_none_match:
        return False
    wanted = _bare(etag)
    return any(c.strip() == "*" or _bare(c) == wanted for c in if_none_match.split(","))


async def respond(send: Send, status: int, body: bytes = b"", headers: Sequence[Header] = ()) -> None:
    heads = [*headers]
    if status != 304:
        heads.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": heads})
    await send({"type": "http.response.body", "body": body if status != 304 else b""})


def ofrep_error(error_code: str, detail: str, key: str | None = None) -> bytes:
    """OFREP's failure body: ``errorCode`` and ``errorDetails`` (and ``key`` when a flag is concerned)."""
    body: dict[str, Any] = {"key": key} if key is not None else {}
    body.update(errorCode=error_code, errorDetails=detail)
    return dumps(body)


def plain_error(error: str, detail: str) -> bytes:
    return error_body(error, detail)


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (``BodyTooLarge``) as soon as it shows."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
