#!/usr/bin/env python3
"""The baseline for bench/compare.py: a naive Starlette + httpx streaming reverse proxy.

Written the way most tutorials and Q&A answers write one: ``client.build_request`` +
``client.send(stream=True)`` + ``StreamingResponse(resp.aiter_raw())``, one uvicorn worker
(uvloop + httptools, access log off, like flagproxy). It resolves no flags: it adds the same static
``X-Feature-Flags`` header as the nginx anchor, and drops hop-by-hop headers so that keep-alive works.

    python bench/naive_proxy.py --origin http://127.0.0.1:9000 [--host 127.0.0.1] [--port 8081]
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

STATIC_FLAGS = ("x-feature-flags", '{"a":true}')
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# httpx sets the origin's Host; a streamed request body goes out chunked.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def build_app(origin: str) -> Starlette:
    client = httpx.AsyncClient(
        base_url=origin,
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
    )

    async def forward(request: Request) -> StreamingResponse:
        url = httpx.URL(path=request.url.path, query=request.url.query.encode("utf-8"))
        headers = [(k, v) for k, v in request.headers.items() if k not in REQUEST_DROP]
        headers.append(STATIC_FLAGS)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_request = client.build_request(
            request.method, url, headers=headers, content=request.stream() if has_body else None
        )
        upstream = await client.send(upstream_request, stream=True)
        # aiter_raw passes the body through unchanged, so Content-Length (when sent) still holds.
        response_headers = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers=response_headers,
            background=BackgroundTask(upstream.aclose),
        )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    routes = [Route("/{path:path}", forward, methods=METHODS)]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Naive Starlette + httpx streaming reverse proxy (baseline).")
    p.add_argument("--origin", required=True, help="origin base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    uvicorn.run(
        build_app(args.origin),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        log_level=args.log_level,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
