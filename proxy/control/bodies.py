"""Reading request bodies on the control plane: bounded, and JSON that every store can take."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from proxy.control.problems import HTTPProblem


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "payload_too_large", f"body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
        # "\ud800" parses, but is no text: Redis (and any UTF-8 consumer) cannot take it
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPProblem(
            400, "invalid_json", "body is not valid JSON: a string holds an unpaired UTF-16 surrogate"
        ) from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise HTTPProblem(400, "invalid_json", f"body is not valid JSON: {detail}") from None
    return value


async def read_json(request: Request, limit: int) -> Any:
    return parse_json(await read_body(request, limit))
