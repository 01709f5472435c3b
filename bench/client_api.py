#!/usr/bin/env python3
"""The client flags API (issue 17) on one worker: throughput of the client endpoints next to the
proxied path in the same run, SSE change delivery, and what 1,000 idle event streams cost.

    python bench/client_api.py                  # the numbers for BENCHMARKS.md (about 2 minutes)
    python bench/client_api.py --quick          # 1 round x 2 s, 200 idle streams: to try the harness
    python bench/client_api.py --rounds 5 --duration 10 --idle-streams 5000 --json bench/results/client.json

One ``flagproxy serve --workers 1`` with the 20-flag mix of bench/compare.py (small configs) in front of
a tiny nginx origin, one ``[[client_keys]]`` entry and the admin token. Then:

1. **Throughput** (wrk, c=32, systems alternating inside each round, the first one rotating):
   ``bulk OFREP`` = ``POST /__flags/ofrep/v1/evaluate/flags`` with ``{"context": {"targetingKey": u, ...}}``,
   ``compact`` = ``GET /__flags/client/v1/flags?key=u&country=..``, ``proxied`` = ``GET /api/bench``
   with ``X-User-Id: u`` (the data plane), u drawn from 10,000 users. req/s, p50, p99, and each
   one's ratio to the proxied path. Targets: >= 3,000 req/s and p99 <= 10 ms for both client endpoints.
2. **SSE delivery**: ``--sse-clients`` streams (aiohttp) on ``GET /__flags/client/v1/stream``, then
   ``--changes`` admin changes one after another (kill / restore of one flag, through
   ``/__flags/api``); for each change, the time from just before the admin request until each client
   has read its event. p50 / p99 / max over changes x clients. Target: p99 <= 1 s.
3. **Idle streams**: the proxied path's latency (wrk) and the worker's RSS without streams, then with
   ``--idle-streams`` event streams open and idle (read, never written to), then the same wrk run.
   Targets: <= 50 MB RSS added; no measurable latency added to proxied requests.

Each measured number is printed as it is; the targets are shown next to them, never applied to them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    MIB,
    WRK_REPORT_LUA,
    BenchError,
    Service,
    Services,
    clean_env,
    cpu_seconds,
    ensure_tools,
    exit_on_sigterm,
    free_port,
    positive_float,
    positive_int,
    rss_bytes,
    run_wrk,
    summarize,
    tool_version,
    wait_ready,
    write_json,
)
from compare import NGINX_ORIGIN, flag_definition, flagproxy_cmd, start_nginx

CONNECTIONS = 32
USERS = 10_000
FLAG_COUNT = 20
TOKEN = "bench-admin-token"
CLIENT_KEY = "bench-client-key-5d1e"
PROXIED_PATH = "/api/bench"
BULK_PATH = "/__flags/ofrep/v1/evaluate/flags"
COMPACT_PATH = "/__flags/client/v1/flags"
STREAM_PATH = "/__flags/client/v1/stream"
CHANGED_FLAG = "bench-flag-0002"  # a weighted-variant flag of the mix: kill / restore changes its value
TARGET_RPS = 3_000
TARGET_P99_MS = 10.0
TARGET_SSE_P99_S = 1.0
TARGET_IDLE_MB = 50.0

CONFIG = """
[client_api]
max_streams = {max_streams}

[[client_keys]]
name = "bench"
key = "{key}"
"""

# u1..u10000 at random (seeded per wrk thread), as an audience comes back
PROXIED_LUA = (
    r"""
math.randomseed(7)
request = function()
  wrk.headers["X-User-Id"] = "u" .. tostring(math.random(1, USERS))
  return wrk.format(nil, "PATH")
end
""".replace("USERS", str(USERS)).replace("PATH", PROXIED_PATH)
    + WRK_REPORT_LUA
)
COMPACT_LUA = (
    r"""
math.randomseed(7)
local countries = {"NZ", "DE", "US", "JP"}
wrk.headers["Authorization"] = "Bearer KEY"
request = function()
  local path = "PATH?key=u" .. tostring(math.random(1, USERS)) .. "&country=" .. countries[math.random(1, 4)]
  return wrk.format("GET", path)
end
""".replace("USERS", str(USERS))
    .replace("KEY", CLIENT_KEY)
    .replace("PATH", COMPACT_PATH)
    + WRK_REPORT_LUA
)
BULK_LUA = (
    r"""
math.randomseed(7)
local countries = {"NZ", "DE", "US", "JP"}
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer KEY"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = '{"context":{"targetingKey":"u' .. tostring(math.random(1, USERS)) ..
    '","country":"' .. countries[math.random(1, 4)] .. '","plan":"free"}}'
  return wrk.format("POST", "PATH", nil, body)
end
""".replace("USERS", str(USERS))
    .replace("KEY", CLIENT_KEY)
    .replace("PATH", BULK_PATH)
    + WRK_REPORT_LUA
)


# --- setup ------------------------------------------------------------------------------------------


def write_inputs(tmp: Path, max_streams: int) -> tuple[Path, Path]:
    flags = {f"bench-flag-{i:04d}": flag_definition(i) for i in range(FLAG_COUNT)}
    flags_path = tmp / "flags.json"
    flags_path.write_text(json.dumps({"flags": flags}, indent=1) + "\n")
    config_path = tmp / "flagproxy.toml"
    config_path.write_text(CONFIG.format(max_streams=max_streams, key=CLIENT_KEY))
    return flags_path, config_path


def request(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib: (status, headers with lower-case names, body); HTTP errors returned."""
    data = json.dumps(body).encode() if body is not None else None
    all_headers = dict(headers or {})
    if data is not None:
        all_headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def admin(service: Service, method: str, path: str) -> Any:
    status, _, body = request(
        service.url + "/__flags/api" + path, method, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    if status != 200:
        raise BenchError(f"admin {method} {path} answered {status}: {body[:500]!r}")
    return json.loads(body)


def sanity(service: Service) -> dict[str, Any]:
    """Each endpoint answers 200 with what the issue says, before anything is measured; the sizes of
    the client responses for 20 flags (plain and gzip)."""
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    status, _, body = request(service.url + PROXIED_PATH, headers={"X-User-Id": "u1"})
    if status != 200:
        raise BenchError(f"GET {PROXIED_PATH} through the proxy answered {status}")
    status, headers, body = request(
        service.url + BULK_PATH, "POST", {"context": {"targetingKey": "u1", "country": "NZ"}}, auth
    )
    if status != 200:
        raise BenchError(f"POST {BULK_PATH} answered {status}: {body[:500]!r}")
    bulk = json.loads(body)
    if len(bulk.get("flags", [])) != FLAG_COUNT:
        raise BenchError(f"bulk OFREP returned {len(bulk.get('flags', []))} flags, expected {FLAG_COUNT}")
    if not bulk.get("eventStreams"):
        print("bench: note: the bulk response advertises no eventStreams", file=sys.stderr)
    status, compact_headers, compact_body = request(
        service.url + f"{COMPACT_PATH}?key=u1&country=NZ", headers=auth
    )
    if status != 200:
        raise BenchError(f"GET {COMPACT_PATH} answered {status}: {compact_body[:500]!r}")
    compact = json.loads(compact_body)
    if len(compact.get("flags", {})) != FLAG_COUNT:
        raise BenchError(f"compact returned {len(compact.get('flags', {}))} flags, expected {FLAG_COUNT}")
    status, _, _ = request(service.url + BULK_PATH, "POST", {"context": {"targetingKey": "u1"}}, {})
    if status != 401:
        raise BenchError(f"POST {BULK_PATH} without a key answered {status}, expected 401")
    return {
        "bulk_bytes": len(body),
        "bulk_gzip_bytes": len(gzip.compress(body)),
        "compact_bytes": len(compact_body),
        "compact_gzip_bytes": len(gzip.compress(compact_body)),
        "compact_cache_control": compact_headers.get("cache-control"),
        "compact_etag": bool(compact_headers.get("etag")),
        "bulk_etag": bool(headers.get("etag")),
    }


def measured(wrk: str, script: Path, service: Service, args: argparse.Namespace) -> dict[str, Any]:
    """One wrk run, plus ``cpu_us``: the proxy's CPU time per request (less noisy than req/s on a
    machine where wrk and the proxy share the CPUs)."""
    before = cpu_seconds(service.pid)
    result = run_wrk(wrk, script, service.url + "/", args.connections, args.duration, 10)
    result["cpu_us"] = (cpu_seconds(service.pid) - before) * 1e6 / max(1, result["requests"])
    return result


# --- 1. throughput ----------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, wrk: str, service: Service, tmp: Path) -> dict[str, Any]:
    scripts = {}
    for name, lua in (("bulk OFREP", BULK_LUA), ("compact", COMPACT_LUA), ("proxied", PROXIED_LUA)):
        path = tmp / f"{name.split()[0]}.lua"
        path.write_text(lua)
        scripts[name] = path
    names = list(scripts)
    url = service.url + "/"  # the scripts give the paths
    for name in names:
        if args.warmup > 0:
            run_wrk(wrk, scripts[name], url, args.connections, args.warmup, 10)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            print(f"bench: throughput round {r + 1} {name}", file=sys.stderr, flush=True)
            samples[name].append(measured(wrk, scripts[name], service, args))
    rows = {name: summarize(samples[name]) for name in names}
    base = rows["proxied"]["rps"]
    for name in names:
        rows[name]["ratio_to_proxied"] = rows[name]["rps"] / base if base else 0.0
        rows[name]["runs_rps"] = [round(s["rps"]) for s in samples[name]]
    return rows


# --- 2. SSE delivery ----------------------------------------------------------------------------------


async def open_stream(session: Any, url: str) -> Any:
    response = await session.get(
        url, headers={"Authorization": f"Bearer {CLIENT_KEY}", "Accept": "text/event-stream"}
    )
    if response.status != 200:
        text = await response.text()
        response.release()
        raise BenchError(f"GET {STREAM_PATH} answered {response.status}: {text[:300]}")
    return response


async def read_events(response: Any, on_event: Callable[[str, str], None]) -> None:
    """SSE framing: ``event:`` / ``data:`` lines up to a blank line; comments (heartbeats) skipped."""
    event, data = "message", []
    while True:
        line = await response.content.readline()
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            if data:
                on_event(event, "\n".join(data))
            event, data = "message", []
        elif text.startswith(":"):
            continue
        elif text.startswith("event:"):
            event = text[6:].strip()
        elif text.startswith("data:"):
            data.append(text[5:].lstrip())


@contextlib.asynccontextmanager
async def event_streams(
    service: Service, count: int, on_event: Callable[[int, str, str], None]
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """``count`` event streams with the client key, opened 100 at a time (a connect storm is not what
    is measured), each read by a task that hands ``on_event(index, event, data)`` what arrives; the
    reading tasks while the block runs (a finished one is a stream the server ended). All closed after."""
    import aiohttp

    url = service.url + STREAM_PATH
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        responses: list[Any] = []
        readers: list[asyncio.Task[None]] = []
        try:
            for first in range(0, count, 100):
                batch = min(100, count - first)
                responses += await asyncio.gather(*(open_stream(session, url) for _ in range(batch)))
            for i, response in enumerate(responses):
                readers.append(asyncio.create_task(read_events(response, functools.partial(on_event, i))))
            yield readers
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for response in responses:
                response.close()


async def sse_delivery(service: Service, clients: int, changes: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    received: list[list[float]] = [[] for _ in range(clients)]
    bad: list[str] = []
    arrived = asyncio.Event()

    def on_event(i: int, event: str, data: str) -> None:
        try:
            kind = json.loads(data).get("type")
        except ValueError:
            kind = None
        if event != "message" or kind != "refetchEvaluation":
            bad.append(f"{event}: {data[:100]}")
            return
        received[i].append(loop.time())
        arrived.set()

    async def change(n: int, action: str, timeout_s: float) -> float:
        """Change number ``n`` (0 = the warm-up); returns when every client has its event."""
        sent = loop.time()
        await loop.run_in_executor(None, admin, service, "POST", f"/flags/{CHANGED_FLAG}/{action}")
        deadline = sent + timeout_s
        while any(len(r) <= n for r in received) and loop.time() < deadline:
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), deadline - loop.time())
        return sent

    latencies: list[float] = []
    missing = 0
    async with event_streams(service, clients, on_event):
        # warm-up, not measured: every stream is registered once each client has seen one change
        await change(0, "kill", 10.0)
        if any(not r for r in received):
            raise BenchError(f"{sum(1 for r in received if not r)} streams got no event for the warm-up")
        for n in range(1, changes + 1):
            sent = await change(n, "restore" if n % 2 else "kill", 5.0)
            for r in received:
                if len(r) > n:
                    latencies.append(r[n] - sent)
                else:
                    missing += 1
                    r.append(float("inf"))  # keep the indexes aligned with the changes
    latencies.sort()
    if not latencies:
        raise BenchError("no SSE event arrived at all")
    return {
        "clients": clients,
        "changes": changes,
        "deliveries": len(latencies),
        "missing": missing,
        "unexpected_events": len(bad),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


# --- 3. idle streams --------------------------------------------------------------------------------


async def idle_streams(args: argparse.Namespace, wrk: str, service: Service, tmp: Path) -> dict[str, Any]:
    """The proxied path without and with the idle streams, alternating (the first rotating) for
    ``--rounds`` rounds; RSS before the first streams are opened, once they are, and after the load."""
    script = tmp / "proxied-idle.lua"
    script.write_text(PROXIED_LUA)
    loop = asyncio.get_running_loop()

    def proxied() -> dict[str, Any]:
        return measured(wrk, script, service, args)

    if args.warmup > 0:
        await loop.run_in_executor(
            None, run_wrk, wrk, script, service.url + "/", args.connections, args.warmup, 10
        )
    before_rss = rss_bytes(service.pid)
    with_rss = after_rss = 0
    connects: list[float] = []
    closed_early = 0
    samples: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for r in range(args.rounds):
        for kind in ("without", "with") if r % 2 == 0 else ("with", "without"):
            if kind == "without":
                samples[kind].append(await loop.run_in_executor(None, proxied))
                continue
            started = time.monotonic()
            async with event_streams(service, args.idle_streams, lambda i, event, data: None) as readers:
                connects.append(time.monotonic() - started)
                with_rss = max(with_rss, rss_bytes(service.pid))
                samples[kind].append(await loop.run_in_executor(None, proxied))
                after_rss = max(after_rss, rss_bytes(service.pid))
                closed_early += sum(1 for t in readers if t.done())
    added = max(with_rss, after_rss) - before_rss
    return {
        "streams": args.idle_streams,
        "connect_s": max(connects),
        "closed_early": closed_early,
        "rss_before_mb": before_rss / MIB,
        "rss_with_mb": with_rss / MIB,
        "rss_after_load_mb": after_rss / MIB,
        "rss_added_mb": added / MIB,
        "rss_per_stream_kb": added / 1024 / max(1, args.idle_streams),
        "proxied_without": summarize(samples["without"]),
        "proxied_with": summarize(samples["with"]),
    }


# --- main ---------------------------------------------------------------------------------------------


def ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--duration", type=positive_float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per system")
    parser.add_argument("--connections", type=positive_int, default=CONNECTIONS)
    parser.add_argument("--sse-clients", type=positive_int, default=50)
    parser.add_argument("--changes", type=positive_int, default=100)
    parser.add_argument("--idle-streams", type=positive_int, default=1000)
    parser.add_argument(
        "--quick", action="store_true", help="1 round x 2 s, 10 clients x 20 changes, 200 streams"
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk or nginx")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
        args.sse_clients, args.changes, args.idle_streams = 10, 20, 200
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise BenchError(
            "aiohttp is needed for the SSE clients: .venv/bin/pip install -e '.[test]'"
        ) from None
    exit_on_sigterm()
    wanted_fds = args.idle_streams * 2 + args.sse_clients * 2 + 1024  # ours and the proxy's (inherited)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted_fds:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted_fds, hard), hard))
    tools = ensure_tools({"nginx": "nginx-light", "wrk": "wrk"}, install=not args.no_install)
    tmp = Path(tempfile.mkdtemp(prefix="flagproxy-bench-client-"))
    services = Services(tmp)
    try:
        return run(args, tools, tmp, services)
    finally:
        services.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tools: dict[str, str], tmp: Path, services: Services) -> int:
    started = time.monotonic()
    port = free_port()
    origin = start_nginx(
        services, tools["nginx"], tmp, "origin", NGINX_ORIGIN.format(host=HOST, port=port, echo="/echo"), port
    )
    wait_ready(origin)
    flags, config = write_inputs(tmp, max_streams=args.idle_streams + args.sse_clients + 100)
    port = free_port()
    cmd = [*flagproxy_cmd(origin.url, flags, port, workers=1), "--config", str(config)]
    proxy = services.start(
        "flagproxy", cmd, port, "/__flags/readyz", env=clean_env({"FLAGPROXY_ADMIN_TOKEN": TOKEN})
    )
    wait_ready(proxy, timeout_s=60)
    sizes = sanity(proxy)
    print(f"bench: responses for {FLAG_COUNT} flags: {json.dumps(sizes)}", file=sys.stderr)

    rows = throughput(args, tools["wrk"], proxy, tmp)
    print("bench: SSE delivery", file=sys.stderr, flush=True)
    sse = asyncio.run(sse_delivery(proxy, args.sse_clients, args.changes))
    print(f"bench: {args.idle_streams} idle streams", file=sys.stderr, flush=True)
    idle = asyncio.run(idle_streams(args, tools["wrk"], proxy, tmp))
    services.check_alive()
    elapsed = time.monotonic() - started

    report: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "wrk": tool_version([tools["wrk"], "-v"]),
        "nginx": tool_version([tools["nginx"], "-v"]),
        "args": vars(args),
        "sizes": sizes,
        "throughput": rows,
        "sse": sse,
        "idle": idle,
        "elapsed_s": elapsed,
    }
    print(
        f"\n### Throughput, one worker, c={args.connections}, "
        f"{args.rounds} x {args.duration:.0f} s (medians)\n"
    )
    print("| endpoint | req/s | vs. proxied | p50 | p99 | CPU µs/req | errors | runs (req/s) | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name, row in rows.items():
        errors = sum(row["errors"].values())
        target = "" if name == "proxied" else f"≥ {TARGET_RPS:,} req/s, p99 ≤ {TARGET_P99_MS:.0f} ms"
        runs = ", ".join(f"{x:,}" for x in row["runs_rps"])
        print(
            f"| {name} | {row['rps']:,.0f} | {row['ratio_to_proxied']:.3f}x | {ms(row['p50_us'])} | "
            f"{ms(row['p99_us'])} | {row['cpu_us']:.0f} | {errors} | {runs} | {target} |"
        )
    print(
        f"\nSSE: {sse['clients']} clients x {sse['changes']} admin changes: {sse['deliveries']} deliveries, "
        f"{sse['missing']} missing, change → event p50 {sse['p50_ms']:.1f} ms, p99 {sse['p99_ms']:.1f} ms, "
        f"max {sse['max_ms']:.1f} ms (target p99 ≤ {TARGET_SSE_P99_S * 1000:.0f} ms)"
    )
    w, wo = idle["proxied_with"], idle["proxied_without"]
    print(
        f"\nIdle streams: {idle['streams']} open ({idle['closed_early']} ended by the server, connected in "
        f"{idle['connect_s']:.1f} s): RSS {idle['rss_before_mb']:.1f} → {idle['rss_with_mb']:.1f} MB, "
        f"{idle['rss_after_load_mb']:.1f} MB after the wrk run "
        f"(+{idle['rss_added_mb']:.1f} MB, {idle['rss_per_stream_kb']:.1f} KB/stream; "
        f"target ≤ {TARGET_IDLE_MB:.0f} MB)"
    )
    print("\n| proxied path | req/s | p50 | p99 | CPU µs/req |")
    print("|---|---:|---:|---:|---:|")
    for label, row in (("without streams", wo), (f"with {idle['streams']} idle streams", w)):
        print(
            f"| {label} | {row['rps']:,.0f} | {ms(row['p50_us'])} | {ms(row['p99_us'])} | "
            f"{row['cpu_us']:.0f} |"
        )
    print(f"\n{elapsed:.0f} s in all")
    if args.json:
        write_json(args.json, report)
    errors = sum(sum(r["errors"].values()) for r in rows.values())
    return 1 if errors or sse["missing"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
    except subprocess.SubprocessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
