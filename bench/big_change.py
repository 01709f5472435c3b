"""Event-loop stall while a big change lands: an N-flag native webhook into a running proxy.

    python bench/big_change.py [--flags 5000] [--routes] [--rounds 3]

The proxy (memory store) is served by uvicorn in this process, in the same event loop as a ticker
task that wakes every millisecond and notes the gaps; the webhook is posted from a worker thread so
the loop measured is the proxy's alone. Reports, per round, the longest gap (the longest time no
request could have been served), the next two, and the time spent in gaps over 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.app import FlagProxy
from proxy.config import load_settings
from proxy.dataplane.client_side import ClientConnection

SECRET = "bench-secret"


def document(count: int, routes: bool, round_no: int) -> bytes:
    def flag(i: int) -> dict[str, Any]:
        condition = {
            "and": [{"==": [{"var": "country"}, "NZ"]}, {"regex": [{"var": "email"}, f"@x{i}\\.com$"]}]
        }
        out: dict[str, Any] = {
            "variants": {"on": {"weight": 50 + round_no}, "off": {"weight": 50}},
            "rules": [{"if": condition, "variant": "on"}],
        }
        if routes:
            out["routes"] = [f"/api/{i}/**"]
        return out

    return json.dumps({"flags": {f"flag_{i:05d}": flag(i) for i in range(count)}}).encode()


def post(url: str, body: bytes) -> int:
    stamp = int(time.time())
    digest = hmac.new(SECRET.encode(), b"%d." % stamp + body, hashlib.sha256).hexdigest()
    signature = f"t={stamp},v1={digest}"
    headers = {"X-Flagproxy-Signature": signature, "Content-Type": "application/json"}
    return httpx.post(url, content=body, headers=headers, timeout=300).status_code


async def measured(url: str, body: bytes) -> tuple[int, list[float], float]:
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    status = await asyncio.to_thread(post, url, body)
    done.set()
    await ticking
    return status, sorted(gaps, reverse=True)[:3], sum(g for g in gaps if g > 0.010)


async def run(count: int, routes: bool, rounds: int) -> list[tuple[int, list[float], float]]:
    flags_file = Path(tempfile.mkdtemp()) / "flags.json"
    flags_file.write_text('{"flags": {}}')
    env = {
        "FLAGPROXY_STORE_FLAGS_FILE": str(flags_file),
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_WEBHOOKS_MAX_BODY_BYTES": str(256 << 20),
    }
    app = FlagProxy(load_settings(env=env, origins=["http://127.0.0.1:9"]))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="error", http=ClientConnection)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # startup failed: raise its error
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/__flags/webhooks/native"
    results = []
    try:
        for round_no in range(rounds):
            body = document(count, routes, round_no)  # built before measuring: client work is not the proxy's
            results.append(await measured(url, body))
    finally:
        server.should_exit = True
        await serving
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", type=int, default=5000)
    parser.add_argument("--routes", action="store_true", help="give every flag its own route glob")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(run(args.flags, args.routes, args.rounds))
    for i, (status, longest, blocked) in enumerate(results, 1):
        top = ", ".join(f"{gap * 1000:.0f}" for gap in longest)
        print(f"round {i}: HTTP {status}, longest stalls {top} ms, in gaps > 10 ms {blocked * 1000:.0f} ms")
    print(f"median longest stall: {statistics.median(r[1][0] for r in results) * 1000:.0f} ms")
    return 0 if all(r[0] == 202 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
