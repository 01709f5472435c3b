"""Propagation: time from a webhook's 202 until every proxy instance serves the new value.

    python bench/propagation.py [--instances 3] [--updates 200] [--json FILE]

Starts a private redis-server (free port, no persistence), the demo origin and N proxies sharing
that Redis, all on 127.0.0.1. Each update flips a boolean flag through the native webhook of one
instance (round robin); every instance is then polled through its data plane (the X-Feature-Flags
header the origin echoes) until it serves the new value. Reports p50/p90/p99/max over all updates.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _harness import clean_env, free_port, proxy_cmd, start_process, stop_process, wait_port

SECRET = "bench-secret"
FLAG = "propagation-probe"


def signed(body: bytes) -> dict[str, str]:
    stamp = int(time.time())
    digest = hmac.new(SECRET.encode(), b"%d." % stamp + body, hashlib.sha256).hexdigest()
    return {"X-Flagproxy-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


async def served_value(session: aiohttp.ClientSession, port: int) -> object:
    async with session.get(f"http://127.0.0.1:{port}/probe", headers={"X-User-Id": "bench"}) as response:
        echoed = await response.json()
    return json.loads(echoed["headers"].get("x-feature-flags", "{}")).get(FLAG)


async def measure(ports: list[int], updates: int, timeout_s: float) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(updates):
            value = i % 2 == 0
            body = json.dumps({"upsert": {FLAG: {"enabled": value}}}).encode()
            target = ports[i % len(ports)]
            async with session.post(
                f"http://127.0.0.1:{target}/__flags/webhooks/native", data=body, headers=signed(body)
            ) as response:
                if response.status != 202:
                    raise RuntimeError(f"webhook answered {response.status}: {await response.text()}")
            accepted = time.perf_counter()

            async def until_served(port: int, expected: bool = value, accepted: float = accepted) -> float:
                deadline = accepted + timeout_s
                while time.perf_counter() < deadline:
                    if await served_value(session, port) is expected:
                        return time.perf_counter() - accepted
                raise RuntimeError(f"instance on {port} did not serve the update within {timeout_s}s")

            done = await asyncio.gather(*(until_served(p) for p in ports))
            latencies.append(max(done) * 1000)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=5.0, help="per update, seconds")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="flagproxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_port, origin_port = free_port(), free_port()
        redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        redis += ["--appendonly", "no", "--dir", str(tmp)]
        procs.append(subprocess.Popen(redis, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(redis_port)
        origin = proxy_cmd("demo-origin", "--port", str(origin_port), "--log-level", "warning")
        procs.append(start_process(origin))
        (tmp / "flags.json").write_text(json.dumps({"flags": {FLAG: {"enabled": False}}}))
        env = clean_env({"FLAGPROXY_WEBHOOKS_SECRET": SECRET, "FLAGPROXY_STORE_ENVIRONMENT": "bench"})
        ports = [free_port() for _ in range(args.instances)]
        for port in ports:
            cmd = proxy_cmd("serve", "--log-level", "warning", "--port", str(port))
            cmd += ["--origin", f"http://127.0.0.1:{origin_port}", "--flags", str(tmp / "flags.json")]
            cmd += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
            procs.append(start_process(cmd, env=env))
        for port in [origin_port, *ports]:
            wait_port(port)
        latencies = asyncio.run(measure(ports, args.updates, args.timeout))
    finally:
        for proc in reversed(procs):  # proxies first, Redis last: no reconnect noise on the way out
            stop_process(proc, timeout_s=5)
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "instances": args.instances,
        "updates": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p90_ms": round(percentile(latencies, 0.90), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
    }
    print("| instances | updates | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['instances']} | {result['updates']} | {result['p50_ms']} | {result['p90_ms']} | "
        f"{result['p99_ms']} | {result['max_ms']} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
