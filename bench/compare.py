#!/usr/bin/env python3
"""Side-by-side benchmark: nginx origin direct, nginx proxy_pass (anchor), a naive Starlette + httpx
proxy (baseline) and flagproxy, all in one run, all on 127.0.0.1, measured with wrk.

    python bench/compare.py                  # 3 rounds x 5 s, c=1 and c=32 (the numbers for BENCHMARKS.md)
    python bench/compare.py --quick          # 1 round x 2 s, to try the harness
    python bench/compare.py --json bench/results/compare.json
    python bench/compare.py --baseline-tree DIR   # also flagproxy from another checkout, same run

Phases (see bench/README.md):

1. throughput/latency: every system in front of the same tiny nginx origin; wrk -t1 at each
   connection count, systems alternating inside each round, medians over rounds;
2. RSS of one flagproxy worker with 5,000 flags loaded, after startup and after some traffic;
3. 1 GiB upload and 1 GiB download streamed through flagproxy (to a raw asyncio origin started from
   this file), sampling the proxy's RSS for its peak growth.

Installs nginx-light and wrk with apt-get when they are missing and we are root. Every process it
starts is stopped on the way out (errors, Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    MIB,
    ROOT,
    WRK_REPORT_LUA,
    BenchError,
    Service,
    Services,
    ToolMissing,
    ensure_tools,
    exit_on_sigterm,
    free_port,
    http_get,
    parse_connections,
    positive_float,
    positive_int,
    proxy_cmd,
    rss_bytes,
    run_wrk,
    summarize,
    tool_version,
    wait_ready,
    write_json,
)

BENCH_PATH = "/api/anything"
ECHO_PATH = "/api/echo-flags"  # the nginx origin answers with the X-Feature-Flags it received
BASELINE = "flagproxy (baseline)"  # flagproxy run from --baseline-tree

# Targets from the performance issue.
TARGET_VS_NGINX = 0.25  # c=32 flagproxy rps >= 0.25 x nginx proxy_pass
TARGET_VS_NAIVE = 20.0  # c=32 flagproxy rps >= 20 x naive proxy
TARGET_ADDED_P50_US = 200.0  # c=1 flagproxy p50 - direct p50
TARGET_RSS_BYTES = 100 * 1000 * 1000  # one worker, 5,000 flags: <= 100 MB
TARGET_STREAM_GROWTH = 16 * MIB  # RSS growth while streaming 1 GiB each way

# wrk: a fresh X-User-Id per request (a counter), so flags resolve per user; done() prints one
# machine-readable line. Latencies are in microseconds, summary.duration too.
WRK_SCRIPT = (
    r"""
local counter = 0
request = function()
  counter = counter + 1
  wrk.headers["X-User-Id"] = tostring(counter)
  return wrk.format(nil, nil)
end
"""
    + WRK_REPORT_LUA
)

NGINX_COMMON = """\
worker_processes 1;
daemon off;
{user}pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-client-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    large_client_header_buffers 4 64k;  # flagproxy's header budget allows ~10 KB of flags
{body}
}}
"""

NGINX_ORIGIN = """\
    server {{
        listen {host}:{port};
        default_type application/json;
        location = {echo} {{ return 200 "$http_x_feature_flags"; }}
        location / {{ return 200 '{{"ok":true}}\\n'; }}
    }}
"""

NGINX_ANCHOR = """\
    upstream origin {{
        server {host}:{origin_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Feature-Flags '{{"a":true}}';
        }}
    }}
"""


# --- checkouts -----------------------------------------------------------------------------------


def git_revision(tree: Path = ROOT) -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy"],
            cwd=tree,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{rev}{' (proxy/ modified)' if dirty else ''}" if rev else "?"


def baseline_env(tree: Path) -> dict[str, str]:
    """Our environment with ``PYTHONPATH=tree``: with ``cwd=tree`` as well, ``python -m proxy`` imports that
    checkout's package (this venv's editable install is a finder consulted only after sys.path)."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def check_baseline_tree(tree: Path) -> str:
    """Where ``proxy`` (and ``proxy.cli``) come from for a child run like the baseline; BenchError unless
    both are inside ``tree``."""
    code = "import proxy, proxy.cli; print(proxy.__file__); print(proxy.cli.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env=baseline_env(tree),
        capture_output=True,
        text=True,
        timeout=60,
    )
    files = [Path(line).resolve() for line in out.stdout.split()]
    if out.returncode != 0 or len(files) != 2 or not all(f.is_relative_to(tree) for f in files):
        raise BenchError(
            f"--baseline-tree {tree}: `import proxy` there does not load that checkout's code "
            f"(got {[str(f) for f in files]}):\n{out.stderr.strip()[-2000:]}"
        )
    return str(files[0])


def check_baseline_process(service: Service, tree: Path) -> str:
    """BenchError unless the running baseline has ``tree`` as its working directory and PYTHONPATH."""
    try:
        cwd = Path(os.readlink(f"/proc/{service.pid}/cwd")).resolve()
        environ = Path(f"/proc/{service.pid}/environ").read_bytes().split(b"\0")
    except OSError as exc:
        raise BenchError(f"{service.name}: cannot read /proc/{service.pid}: {exc}") from None
    prefix = b"PYTHONPATH="
    pythonpath = next((e.removeprefix(prefix).decode() for e in environ if e.startswith(prefix)), "")
    if cwd != tree or pythonpath != str(tree):
        raise BenchError(f"{service.name} runs in {cwd} with PYTHONPATH={pythonpath!r}, not {tree}")
    return f"{BASELINE}: pid {service.pid} runs in {cwd} with PYTHONPATH={pythonpath}"


# --- RSS ------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cmdline_label(pid: int) -> str:
    """ "worker", or what else a child of the serve process is (multiprocessing helpers)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return "?"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "forkserver" in cmd:
        return "forkserver"
    return "worker"


class PeakSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss_bytes(self.pid))


def mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


# --- flag files -----------------------------------------------------------------------------------


def flag_definition(i: int) -> dict[str, Any]:
    """Flag ``i`` of a realistic mix: booleans, rollouts, weighted variants with configs, targeting rules."""
    kind = i % 5
    if kind == 0:  # kill switch
        return {"enabled": i % 10 != 5, "priority": 100, "note": "kill switch"}
    if kind == 1:  # gradual boolean rollout, staff override by key
        return {
            "percentage": 10 + (i * 7) % 80,
            "rules": [{"if": {"regex": [{"var": "key"}, "7$"]}, "value": True}],
            "priority": 20,
        }
    if kind == 2:  # weighted experiment with per-variant configs
        return {
            "variants": {
                "control": {"weight": 50, "config": {"threshold": 0.85, "window": 300}},
                "treatment_a": {"weight": 25, "config": {"threshold": 0.75, "window": 180}},
                "treatment_b": {"weight": 25, "config": {"threshold": 0.80, "window": 120}},
            },
            "defaultVariant": "control",
            "priority": 50,
        }
    if kind == 3:  # targeted variants, a rollout inside a rule, a route restriction matching the bench path
        return {
            "variants": {
                "control": {"weight": 90, "config": {"price": "$2.99"}},
                "treatment": {"weight": 10, "config": {"price": "$1.99"}},
            },
            "defaultVariant": "control",
            "routes": ["/api/**"],
            "rules": [
                {"if": {"in": [{"var": "method"}, ["POST", "PUT"]]}, "variant": "treatment"},
                {
                    "if": {"starts_with": [{"var": "path"}, "/api/"]},
                    "rollout": {"control": 50, "treatment": 50},
                },
            ],
            "priority": 40,
        }
    return {  # kind 4: variants without configs, a numeric rule on the key
        "variants": {"off": {"weight": 70}, "blue": {"weight": 20}, "green": {"weight": 10}},
        "defaultVariant": "off",
        "rules": [{"if": {"<": [{"var": "key"}, 1000]}, "variant": "blue"}],
        "priority": 10,
    }


def write_flags(path: Path, count: int) -> Path:
    flags = {f"bench-flag-{i:04d}": flag_definition(i) for i in range(count)}
    path.write_text(json.dumps({"flags": flags}, indent=1) + "\n")
    return path


# --- wrk ------------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    connections: int
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    requests: int
    errors: dict[str, int]
    rounds: int
    samples: list[dict[str, float]] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def aggregate(system: str, connections: int, samples: list[dict[str, Any]]) -> Row:
    """Medians over rounds for rates and percentiles; error counts are summed."""
    return Row(
        system=system,
        connections=connections,
        **summarize(samples),
        samples=[{k: s[k] for k in ("rps", "p50_us", "p99_us")} for s in samples],
    )


# --- the systems ----------------------------------------------------------------------------------


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers would otherwise run as nobody
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(user=user, dir=tmp, name=name, body=body))
    return conf


def start_nginx(services: Services, nginx: str, tmp: Path, name: str, body: str, port: int) -> Service:
    conf = nginx_conf(tmp, name, body)
    error_log = tmp / f"{name}.error.log"
    cmd = [nginx, "-p", str(tmp), "-e", str(error_log), "-c", str(conf)]
    return services.start(name, cmd, port, "/", extra_logs=[error_log])


def flagproxy_cmd(origin: str, flags: Path, port: int, workers: int | None = None) -> list[str]:
    cmd = proxy_cmd("serve", "--origin", origin, "--flags", str(flags))
    cmd += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


def serve_supports_workers() -> bool:
    out = subprocess.run(
        proxy_cmd("serve", "--help"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--workers" in out.stdout


def flags_seen(service: Service, user: str = "42") -> dict[str, Any] | None:
    """The X-Feature-Flags the origin received through ``service`` (the origin echoes it)."""
    status, body = http_get(service.url + ECHO_PATH, {"X-User-Id": user})
    if status != 200:
        raise BenchError(f"{service.name}: GET {ECHO_PATH} answered {status}: {body[:300]!r}")
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise BenchError(f"{service.name}: X-Feature-Flags is not JSON: {text[:300]!r}") from None
    return value if isinstance(value, dict) else None


# --- streaming: a raw asyncio origin and blocking clients -----------------------------------------


def stream_origin_main(port: int) -> int:
    """POST/PUT anything: read and discard the body (Content-Length or chunked), answer
    ``{"received": n}``; ``GET /download?bytes=N``: N generated bytes with a Content-Length."""
    import asyncio
    from urllib.parse import parse_qs

    block = memoryview(b"x" * MIB)

    async def discard(reader: asyncio.StreamReader, n: int) -> None:
        while n > 0:
            chunk = await reader.read(min(n, MIB))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                received = 0
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                                pass
                            break
                        await discard(reader, size)
                        received += size
                        await reader.readexactly(2)
                else:
                    received = int(headers.get("content-length", "0"))
                    await discard(reader, received)
                path, _, query = target.partition("?")
                if path == "/download":
                    size = int(parse_qs(query).get("bytes", ["0"])[0])
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: %d\r\n\r\n" % size
                    )
                    remaining = size
                    while remaining > 0:
                        n = min(len(block), remaining)
                        writer.write(block[:n])
                        remaining -= n
                        await writer.drain()
                else:
                    body = json.dumps({"received": received, "path": path}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, HOST, port, limit=64 * 1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    return 0


def read_response(sock: socket.socket, keep_body: bool) -> tuple[int, int, bytes]:
    """(status, body length, body if ``keep_body``) of one HTTP/1.1 response; the body is discarded
    as it arrives otherwise."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"connection closed before the response head: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = bytearray()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        data = bytearray(rest)
        total = 0
        while True:  # small bodies only (our JSON answers and error pages)
            while b"\r\n" not in data:
                data += sock.recv(65536)
            size_line, _, tail = bytes(data).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            data = bytearray(tail)
            if size == 0:
                break
            while len(data) < size + 2:
                more = sock.recv(65536)
                if not more:
                    raise BenchError("connection closed mid-body")
                data += more
            body += data[:size]
            total += size
            data = data[size + 2 :]
        return status, total, bytes(body) if keep_body else b""
    length = int(headers.get("content-length", "0"))
    got = len(rest)
    if keep_body:
        body += rest
    while got < length:
        chunk = sock.recv(min(MIB, length - got))
        if not chunk:
            raise BenchError(f"connection closed after {got} of {length} body bytes")
        got += len(chunk)
        if keep_body:
            body += chunk
    return status, got, bytes(body)


def upload(port: int, size: int, timeout_s: float) -> tuple[int, int, float]:
    """POST ``size`` bytes with a Content-Length; returns (status, bytes the origin saw, seconds)."""
    block = memoryview(b"u" * MIB)
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(
            (
                f"POST /upload HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-User-Id: 7\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
            ).encode()
        )
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            sock.sendall(block[:n])
            sent += n
        status, _, body = read_response(sock, keep_body=True)
    seconds = time.monotonic() - start
    try:
        received = int(json.loads(body)["received"])
    except (ValueError, KeyError, TypeError):
        received = -1
    return status, received, seconds


def download(port: int, size: int, timeout_s: float) -> tuple[int, int, float]:
    """GET ``size`` generated bytes; returns (status, bytes received, seconds)."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(
            f"GET /download?bytes={size} HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-User-Id: 7\r\n\r\n".encode()
        )
        status, got, _ = read_response(sock, keep_body=False)
    return status, got, time.monotonic() - start


# --- phases ---------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    tools: dict[str, str]
    tmp: Path
    services: Services
    script: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    origin: Service | None = None

    def wrk(self, service: Service, connections: int, duration_s: float) -> dict[str, Any]:
        """One wrk -t1 run against ``BENCH_PATH`` on ``service``."""
        url = service.url + BENCH_PATH
        return run_wrk(self.tools["wrk"], self.script, url, connections, duration_s, self.args.timeout)


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def start_origin(ctx: Context) -> Service:
    port = free_port()
    body = NGINX_ORIGIN.format(host=HOST, port=port, echo=ECHO_PATH)
    origin = start_nginx(ctx.services, ctx.tools["nginx"], ctx.tmp, "origin", body, port)
    wait_ready(origin)
    return origin


def phase_throughput(ctx: Context, flags20: Path, workers_supported: bool) -> list[Row]:
    args = ctx.args
    origin = ctx.origin
    assert origin is not None
    systems: list[tuple[str, Service]] = [("direct", origin)]

    port = free_port()
    body = NGINX_ANCHOR.format(host=HOST, port=port, origin_port=origin.url.rsplit(":", 1)[1])
    anchor = start_nginx(ctx.services, ctx.tools["nginx"], ctx.tmp, "nginx-anchor", body, port)
    systems.append(("nginx", anchor))

    port = free_port()
    naive_cmd = [sys.executable, str(ROOT / "bench" / "naive_proxy.py"), "--origin", origin.url]
    naive = ctx.services.start("naive", [*naive_cmd, "--host", HOST, "--port", str(port)], port, BENCH_PATH)
    systems.append(("naive", naive))

    port = free_port()
    fp = ctx.services.start("flagproxy", flagproxy_cmd(origin.url, flags20, port), port, "/__flags/healthz")
    systems.append(("flagproxy", fp))

    baseline = None
    if args.baseline_tree is not None:  # the same command from the other checkout, same interpreter
        tree = args.baseline_tree
        port = free_port()
        cmd = flagproxy_cmd(origin.url, flags20, port)
        env = baseline_env(tree)
        baseline = ctx.services.start("flagproxy-baseline", cmd, port, "/__flags/healthz", cwd=tree, env=env)
        systems.append((BASELINE, baseline))

    if workers_supported:
        port = free_port()
        cmd = flagproxy_cmd(origin.url, flags20, port, workers=2)
        fp2 = ctx.services.start("flagproxy-w2", cmd, port, "/__flags/healthz")
        systems.append(("flagproxy --workers 2", fp2))
    else:
        ctx.notes.append(
            "`flagproxy serve --workers` is not supported by this checkout (not in `serve --help`): "
            "the `--workers 2` row is skipped"
        )

    for _, service in systems:
        wait_ready(service)
    if baseline is not None:
        ctx.notes.append(check_baseline_process(baseline, args.baseline_tree))

    # Sanity: everything answers 200 on the bench path, and the origin sees the flag header.
    for name, service in systems:
        status, body = http_get(service.url + BENCH_PATH, {"X-User-Id": "1"})
        if status != 200:
            raise BenchError(f"{name}: GET {BENCH_PATH} answered {status}: {body[:300]!r}")
    for name, service in systems[1:]:
        seen = flags_seen(service)
        if not seen:
            raise BenchError(f"{name}: the origin did not receive X-Feature-Flags")
        if name.startswith("flagproxy"):
            size = len(json.dumps(seen, separators=(",", ":")))
            ctx.notes.append(f"{name}: the origin received {len(seen)} flags in X-Feature-Flags ({size} B)")
            if len(seen) != args.flag_count:
                ctx.warnings.append(f"{name}: {len(seen)} of {args.flag_count} flags reached the origin")

    conns = args.connections
    if args.warmup > 0:
        for name, service in systems:
            progress(f"warm-up {name} c={max(conns)} {args.warmup:g}s (discarded)")
            ctx.wrk(service, max(conns), args.warmup)

    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(conns) * len(systems)
    done = 0
    for r in range(args.rounds):
        for c in conns:
            shift = (r + conns.index(c)) % len(systems)  # rotate who goes first, so drift hits all alike
            for name, service in systems[shift:] + systems[:shift]:
                done += 1
                progress(f"[{done}/{total}] round {r + 1} {name} c={c} {args.duration:g}s")
                result = ctx.wrk(service, c, args.duration)
                samples.setdefault((name, c), []).append(result)
                ctx.services.check_alive()

    if workers_supported:
        fp2 = dict(systems)["flagproxy --workers 2"]
        tree = process_tree(fp2.pid)
        children = [f"{cmdline_label(pid)} {mib(rss_bytes(pid))}" for pid in tree[1:]]
        ctx.notes.append(
            f"flagproxy --workers 2 after the run, RSS: supervisor {mib(rss_bytes(tree[0]))}; "
            f"children: {', '.join(children) or 'none found'}"
        )

    for name, service in systems[1:]:
        tail = service.log_tail(1500).strip()
        if tail:
            ctx.notes.append(f"{name} log (warnings and above, last lines):\n```\n{tail}\n```")
    for _, service in systems[1:]:
        ctx.services.stop(service)
    return [aggregate(name, c, samples[(name, c)]) for c in conns for name, _ in systems]


def phase_rss(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    origin = ctx.origin
    assert origin is not None
    flags = write_flags(ctx.tmp / f"flags-{args.rss_flags}.json", args.rss_flags)
    port = free_port()
    fp = ctx.services.start("flagproxy-5k", flagproxy_cmd(origin.url, flags, port), port, "/__flags/healthz")
    ready_s = wait_ready(fp, timeout_s=120)
    time.sleep(0.5)
    after_start = rss_bytes(fp.pid)
    seen = flags_seen(fp) or {}
    traffic_s = min(args.duration, 3.0)
    progress(f"RSS: {args.rss_flags} flags loaded, {traffic_s:g}s of traffic at c=32")
    result = ctx.wrk(fp, 32, traffic_s)
    time.sleep(0.5)
    after_traffic = rss_bytes(fp.pid)
    ctx.services.check_alive()
    errors = sum(result["errors"].values())
    if errors:
        ctx.warnings.append(f"RSS phase ({args.rss_flags} flags): wrk errors {result['errors']}")
    tail = fp.log_tail(1500).strip()
    if tail:
        ctx.notes.append(f"flagproxy with {args.rss_flags} flags, log (last lines):\n```\n{tail}\n```")
    ctx.notes.append(
        f"flagproxy with {args.rss_flags} flags: ready in {ready_s:.1f}s; {len(seen)} flags reached the "
        f"origin after budget trimming; {result['rps']:,.0f} req/s, p50 {result['p50_us']:,} µs at c=32"
    )
    ctx.services.stop(fp)
    return {
        "flags": args.rss_flags,
        "ready_s": round(ready_s, 2),
        "rss_after_start": after_start,
        "rss_after_traffic": after_traffic,
        "traffic_rps": round(result["rps"], 1),
        "traffic_p50_us": result["p50_us"],
        "traffic_errors": result["errors"],
        "flags_in_header": len(seen),
    }


def phase_stream(ctx: Context, flags20: Path) -> dict[str, Any]:
    args = ctx.args
    size = args.stream_mib * MIB
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stream-origin", str(port)]
    sorigin = ctx.services.start("stream-origin", cmd, port, "/healthz")
    wait_ready(sorigin)
    port = free_port()
    cmd = flagproxy_cmd(sorigin.url, flags20, port)
    fp = ctx.services.start("flagproxy-stream", cmd, port, "/__flags/healthz")
    wait_ready(fp)

    # Warm the upstream pool and the code paths, then take the baseline.
    for _ in range(3):
        upload(port, MIB, args.stream_timeout)
        download(port, MIB, args.stream_timeout)
    time.sleep(0.3)
    out: dict[str, Any] = {"bytes": size}
    for direction, call in (("upload", upload), ("download", download)):
        baseline = rss_bytes(fp.pid)
        progress(f"stream: {direction} {mib(size)} through flagproxy")
        with PeakSampler(fp.pid) as sampler:
            try:
                status, count, seconds = call(port, size, args.stream_timeout)
            except (OSError, BenchError) as exc:
                raise BenchError(f"{direction} of {mib(size)} failed: {exc}\n{fp.log_tail()}") from None
        ctx.services.check_alive()
        time.sleep(0.3)
        after = rss_bytes(fp.pid)
        if status != 200 or count != size:
            ctx.warnings.append(f"stream {direction}: HTTP {status}, {count} of {size} bytes arrived")
        out[direction] = {
            "status": status,
            "bytes_through": count,
            "seconds": round(seconds, 2),
            "mib_per_s": round(size / MIB / seconds, 1) if seconds > 0 else 0.0,
            "rss_before": baseline,
            "rss_peak": sampler.peak,
            "rss_after": after,
            "peak_growth": sampler.peak - baseline,
        }
    tail = fp.log_tail(1500).strip()
    if tail:
        ctx.notes.append(f"flagproxy (streaming) log (last lines):\n```\n{tail}\n```")
    ctx.services.stop(fp)
    ctx.services.stop(sorigin)
    return out


# --- output ---------------------------------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else ""


def markdown_table(rows: list[Row]) -> str:
    by = {(r.system, r.connections): r for r in rows}
    lines = [
        "| system | c | req/s | p50 µs | p99 µs | errors | vs nginx | vs naive | added p50 vs direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        nginx = by.get(("nginx", r.connections))
        naive = by.get(("naive", r.connections))
        direct = by.get(("direct", r.connections))
        added = f"{r.p50_us - direct.p50_us:+,.0f} µs" if direct and r.system != "direct" else ""
        errors = f"**{r.error_count}**" if r.error_count else "0"
        lines.append(
            f"| {r.system} | {r.connections} | {r.rps:,.0f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {errors} "
            f"| {ratio(r.rps, nginx.rps if nginx else None) if r.system != 'nginx' else ''} "
            f"| {ratio(r.rps, naive.rps if naive else None) if r.system != 'naive' else ''} | {added} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row], rss: dict[str, Any] | None, stream: dict[str, Any] | None) -> list[str]:
    by = {(r.system, r.connections): r for r in rows}
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    fp32, nginx32, naive32 = by.get(("flagproxy", 32)), by.get(("nginx", 32)), by.get(("naive", 32))
    if fp32 and nginx32 and nginx32.rps:
        x = fp32.rps / nginx32.rps
        ok = verdict(x >= TARGET_VS_NGINX)
        out.append(f"c=32 flagproxy / nginx proxy_pass = {x:.2f}x (target >= {TARGET_VS_NGINX}x): {ok}")
    if fp32 and naive32 and naive32.rps:
        x = fp32.rps / naive32.rps
        ok = verdict(x >= TARGET_VS_NAIVE)
        out.append(f"c=32 flagproxy / naive = {x:.2f}x (target >= {TARGET_VS_NAIVE:g}x): {ok}")
    fp1, direct1 = by.get(("flagproxy", 1)), by.get(("direct", 1))
    if fp1 and direct1:
        added = fp1.p50_us - direct1.p50_us
        out.append(
            f"c=1 flagproxy p50 - direct p50 = {added:+,.0f} µs (target <= {TARGET_ADDED_P50_US:g} µs): "
            f"{verdict(added <= TARGET_ADDED_P50_US)}"
        )
    w2 = by.get(("flagproxy --workers 2", 32))
    if fp32 and w2 and fp32.rps:
        x = w2.rps / fp32.rps
        out.append(f"c=32 flagproxy --workers 2 / 1 worker = {x:.2f}x (no target; the cores are shared)")
    for c in dict.fromkeys(r.connections for r in rows):
        fp, base = by.get(("flagproxy", c)), by.get((BASELINE, c))
        if fp and base and base.rps:
            out.append(
                f"c={c} flagproxy / {BASELINE} = {fp.rps / base.rps:.2f}x "
                f"(req/s; p50 {fp.p50_us:,.0f} vs {base.p50_us:,.0f} µs; no target)"
            )
    if rss:
        worst = max(rss["rss_after_start"], rss["rss_after_traffic"])
        out.append(
            f"RSS of one worker with {rss['flags']} flags: {worst / 1e6:,.1f} MB "
            f"(after startup {rss['rss_after_start'] / 1e6:,.1f} MB, after traffic "
            f"{rss['rss_after_traffic'] / 1e6:,.1f} MB; target <= {TARGET_RSS_BYTES / 1e6:g} MB): "
            f"{verdict(worst <= TARGET_RSS_BYTES)}"
        )
    if stream:
        for direction in ("upload", "download"):
            d = stream.get(direction)
            if not d:
                continue
            complete = d["status"] == 200 and d["bytes_through"] == stream["bytes"]
            ok = complete and d["peak_growth"] <= TARGET_STREAM_GROWTH
            out.append(
                f"{mib(stream['bytes'])} {direction} through flagproxy: "
                f"peak RSS growth {mib(d['peak_growth'])} "
                f"({mib(d['rss_before'])} -> peak {mib(d['rss_peak'])}, after {mib(d['rss_after'])}; "
                f"HTTP {d['status']}, {d['mib_per_s']:,.0f} MiB/s; target <= {mib(TARGET_STREAM_GROWTH)}): "
                f"{verdict(ok)}"
            )
    return out


# --- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="nginx direct / nginx proxy_pass / naive Starlette+httpx / flagproxy, side by side."
    )
    p.add_argument("--duration", type=positive_float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds; the table shows medians (default 3)"
    )
    p.add_argument(
        "--connections", type=parse_connections, default=[1, 32], help="comma-separated (default 1,32)"
    )
    p.add_argument(
        "--warmup", type=float, default=2.0, help="discarded warm-up seconds per system (default 2)"
    )
    p.add_argument("--timeout", type=positive_float, default=2.0, help="wrk per-request timeout (default 2s)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up: to try the harness")
    p.add_argument(
        "--flag-count", type=positive_int, default=20, help="flags resolved per request (default 20)"
    )
    p.add_argument(
        "--rss-flags", type=positive_int, default=5000, help="flags for the RSS check (default 5000)"
    )
    p.add_argument("--stream-mib", type=positive_int, default=1024, help="MiB up and down (default 1024)")
    p.add_argument("--stream-timeout", type=positive_float, default=60.0, help="socket silence limit, s")
    p.add_argument("--skip-rss", action="store_true", help="skip the 5,000-flag RSS check")
    p.add_argument("--skip-stream", action="store_true", help="skip the 1 GiB upload/download check")
    p.add_argument("--no-install", action="store_true", help="never apt-get install nginx-light / wrk")
    p.add_argument("--json", metavar="FILE", help="also write meta, rows, RSS and notes as JSON")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help=f"also run flagproxy from this other checkout (e.g. a clone of an older commit) as {BASELINE!r}",
    )
    p.add_argument("--stream-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)  # internal
    return p


def run(args: argparse.Namespace, tools: dict[str, str], tmp: Path, services: Services) -> dict[str, Any]:
    script = tmp / "report.lua"
    script.write_text(WRK_SCRIPT)
    ctx = Context(args, tools, tmp, services, str(script))
    flags20 = write_flags(tmp / f"flags-{args.flag_count}.json", args.flag_count)
    workers_supported = serve_supports_workers()
    if args.baseline_tree is not None:
        imported = check_baseline_tree(args.baseline_tree)
        rev = git_revision(args.baseline_tree)
        ctx.notes.append(
            f"{BASELINE}: git {rev}; `import proxy` with its cwd and PYTHONPATH loads {imported}"
        )
    ctx.origin = start_origin(ctx)
    rows = phase_throughput(ctx, flags20, workers_supported)
    rss = stream = None
    if not args.skip_rss:
        try:
            rss = phase_rss(ctx)
        except BenchError as exc:  # keep the throughput table; report the failure
            ctx.warnings.append(f"RSS phase failed: {exc}")
            services.stop_all_but(ctx.origin)
    if not args.skip_stream:
        try:
            stream = phase_stream(ctx, flags20)
        except BenchError as exc:
            ctx.warnings.append(f"streaming phase failed: {exc}")
            services.stop_all_but(ctx.origin)
    for r in rows:
        if r.error_count:
            ctx.warnings.append(
                f"{r.system} c={r.connections}: errors {r.errors} over {r.rounds} run(s) "
                "(status = non-2xx/3xx responses; connect/read/write/timeout = socket errors)"
            )
    return {"rows": rows, "rss": rss, "stream": stream, "notes": ctx.notes, "warnings": ctx.warnings}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stream_origin is not None:
        return stream_origin_main(args.stream_origin)
    if args.baseline_tree is not None:
        args.baseline_tree = args.baseline_tree.resolve()
        if not (args.baseline_tree / "proxy" / "__init__.py").is_file():
            parser.error(f"--baseline-tree {args.baseline_tree}: no proxy/__init__.py there")
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
    if not Path("/proc/self/status").exists():
        print("bench: needs Linux (/proc) for RSS sampling", file=sys.stderr)
        return 2
    try:
        tools = ensure_tools({"nginx": "nginx-light", "wrk": "wrk"}, install=not args.no_install)
    except ToolMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    # A plain `kill` of the benchmark must still run the finally below and stop the servers.
    exit_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp_dir:
        tmp = Path(tmp_dir)
        services = Services(tmp)
        try:
            result = run(args, tools, tmp, services)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            services.stop_all()

    rows: list[Row] = result["rows"]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "git": git_revision(),
        "wrk": tool_version([tools["wrk"], "--version"]),
        "nginx": tool_version([tools["nginx"], "-v"]).removeprefix("nginx version: "),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "path": BENCH_PATH,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "flags_per_request": args.flag_count,
    }
    git = f"git {meta['git']}"
    if args.baseline_tree is not None:
        meta["baseline_tree"] = str(args.baseline_tree)
        meta["baseline_git"] = git_revision(args.baseline_tree)
        git += f" (baseline: git {meta['baseline_git']})"
    print(
        f"\n{meta['date']}, {git}: GET {BENCH_PATH} with a fresh X-User-Id per request, "
        f"wrk -t1 -d{args.duration:g}s, {args.rounds} round(s), medians; {meta['cpus']} CPUs "
        f"(shared by wrk and every system), load average before {meta['loadavg_before'][0]}, "
        f"{meta['nginx']}, {meta['wrk']}, Python {meta['python']}\n"
    )
    print(markdown_table(rows))
    print()
    for line in targets(rows, result["rss"], result["stream"]):
        print(f"- {line}")
    for line in result["warnings"]:
        print(f"- WARNING: {line}")
    for line in result["notes"]:
        print(f"- {line}")

    if args.json:
        report = {
            "meta": meta,
            "rows": [asdict(r) for r in rows],
            "rss": result["rss"],
            "stream": result["stream"],
            "targets": targets(rows, result["rss"], result["stream"]),
            "warnings": result["warnings"],
            "notes": result["notes"],
        }
        write_json(args.json, report)
    return 1 if result["warnings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
