"""Reference point for BENCHMARKS.md: the least a raw-ASGI + aiohttp forwarder can do per request.

No flags, no header rules, no timeouts, no streaming: copy the request, read the whole response,
send it back. What flagproxy costs above this is its own work; this much is uvicorn's and aiohttp's.

    python bench/bare_forwarder.py --port 8300 --origin http://127.0.0.1:9300
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn


def make_app(origin: str) -> Any:
    session: aiohttp.ClientSession | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert session is not None
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        async with session.request(scope["method"], origin + scope["path"], headers=headers) as response:
            body = await response.read()
            out = [(k.lower(), v) for k, v in response.raw_headers if k.lower() != b"transfer-encoding"]
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--origin", default="http://127.0.0.1:9000")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.origin),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
