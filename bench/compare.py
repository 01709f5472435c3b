#!/usr/bin/env python3
"""Side-by-side benchmark: nginx origin direct, nginx proxy_pass (anchor), a naive Starlette + httpx
proxy (baseline) and flagproxy, all in one run, all on 127.0.0.1, measured with wrk.

    python bench/compare.py                  # 3 rounds x 5 s, c=1 and c=32 (the numbers for BENCHMARKS.md)
    python bench/compare.py --quick          # 1 round x 2 s, small transfers, to try the harness
    python bench/compare.py --json bench/results/compare.json
    python bench/compare.py --baseline-tree DIR   # also flagproxy from another checkout, same run

Phases (see bench/README.md):

1. throughput/latency: every system in front of the same tiny nginx origin; wrk -t1 at each
   connection count, systems alternating inside each round, medians over rounds; CPU time of each
   server's process tree per request (from /proc) beside req/s; flagproxy also with --access-log
   (the observer's cost) and with --workers 2;
2. flag count: one flagproxy each with 20, 200, 1,000 and 5,000 flags, alternating at c=32;
3. RSS of one flagproxy worker with 5,000 flags loaded, after startup and after some traffic;
4. 1 GiB upload and 1 GiB download streamed through flagproxy (to a raw asyncio origin started from
   this file), sampling the proxy's RSS for its peak growth;
5. WebSocket echo: 32 clients exchange 100,000 messages through flagproxy with a ``websockets`` echo
   origin (started from this file), sampling the proxy's RSS for its peak growth.

Installs nginx-light and wrk with apt-get when they are missing and we are root. Every process it
starts is stopped on the way out (errors, Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import contextlib
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
    CLK_TCK,
    HOST,
    MIB,
    ROOT,
    WRK_REPORT_LUA,
    BenchError,
    Service,
    Services,
    ToolMissing,
    cpu_seconds,
    ensure_tools,
    exit_on_sigterm,
    free_port,
    http_get,
    http_request,
    parse_connections,
    parse_counts,
    positive_float,
    positive_int,
    process_tree,
    proxy_cmd,
    rss_bytes,
    run_wrk,
    summarize,
    tool_version,
    wait_ready,
    write_json,
)

BENCH_PATH = "/api/anything"
# The nginx origin answers this path with the X-Feature-Flags it received as the body and the
# X-Feature-Flags-Omitted it received as X-Echo-Omitted. Under /api/ like BENCH_PATH, so the same flags
# apply (every generated flag does: kind 3 is restricted to /api/**, the others apply everywhere).
ECHO_PATH = "/api/echo-flags"
WS_PATH = "/api/ws"  # the WebSocket echo origin answers any path but /healthz with an echo
BASELINE = "flagproxy (baseline)"  # flagproxy run from --baseline-tree
ACCESS_LOG = "flagproxy --access-log"
WORKERS2 = "flagproxy --workers 2"

# Targets from the performance issue.
TARGET_VS_NGINX = 0.40  # c=32, one worker, 20 flags, budget on: flagproxy rps >= 0.40 x nginx proxy_pass
TARGET_ADDED_P50_US = 100.0  # c=1 flagproxy p50 - direct p50 <= 100 µs
FLAG_BASE = 20  # the flag-count ratios are to the 20-flag flagproxy of the same phase
TARGET_FLAG_RATIOS = {200: 0.5, 5000: 0.25}  # flags -> min req/s ratio to the 20-flag flagproxy
FLAGS_CONNECTIONS = 32  # wrk connections in the flag-count phase
TARGET_RSS_BYTES = 80 * 1000 * 1000  # one worker, 5,000 flags, after traffic: <= 80 MB
TARGET_STREAM_GROWTH = 16 * MIB  # RSS growth while streaming 1 GiB each way
TARGET_WS_GROWTH = 16 * MIB  # peak RSS growth during the WebSocket echo phase ("flat memory")
WS_MESSAGE_BYTES = 32

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
        location = {echo} {{
            add_header X-Echo-Omitted "$http_x_feature_flags_omitted" always;
            return 200 "$http_x_feature_flags";
        }}
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
    cpu_us: float | None = None  # median CPU µs per request of the server's process tree
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
        samples=[{k: s[k] for k in ("rps", "p50_us", "p99_us", "cpu_us", "requests")} for s in samples],
    )


@dataclass
class FlagRow:
    """One flagproxy of the flag-count phase: its wrk row, RSS after the phase and what the origin saw."""

    flags: int
    row: Row
    rss_after: int
    flags_in_header: int
    omitted_header: int
    header_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "flags": self.flags,
            **asdict(self.row),
            "rss_after_traffic": self.rss_after,
            "flags_in_header": self.flags_in_header,
            "omitted_header": self.omitted_header,
            "header_bytes": self.header_bytes,
        }


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


def flagproxy_cmd(
    origin: str, flags: Path, port: int, workers: int | None = None, access_log: bool = False
) -> list[str]:
    cmd = proxy_cmd("serve", "--origin", origin, "--flags", str(flags), "--allow-empty")  # the 0-flag runs
    cmd += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if access_log:
        cmd.append("--access-log")
    return cmd


def serve_help() -> str:
    out = subprocess.run(
        proxy_cmd("serve", "--help"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise BenchError(f"`flagproxy serve --help` failed ({out.returncode}):\n{out.stderr.strip()[-2000:]}")
    return out.stdout


@dataclass
class Seen:
    """What the origin received through a proxy on ``ECHO_PATH``."""

    flags: dict[str, Any]  # X-Feature-Flags
    omitted: int  # X-Feature-Flags-Omitted (0 when absent)
    header_bytes: int  # length of the X-Feature-Flags value

    def accounts_for(self, count: int) -> bool:
        """Every one of ``count`` flags either arrived or is counted in X-Feature-Flags-Omitted (which
        also counts flags that arrived without their config, so this is >=, not ==)."""
        return len(self.flags) + self.omitted >= count


def flags_seen(service: Service, user: str = "42") -> Seen:
    """The flag headers the origin received through ``service`` (the origin echoes them)."""
    status, headers, body = http_request(service.url + ECHO_PATH, {"X-User-Id": user})
    if status != 200:
        raise BenchError(f"{service.name}: GET {ECHO_PATH} answered {status}: {body[:300]!r}")
    text = body.decode("utf-8", "replace").strip()
    omitted_text = headers.get("x-echo-omitted", "").strip() or "0"
    try:
        omitted = int(omitted_text)
    except ValueError:
        raise BenchError(f"{service.name}: X-Feature-Flags-Omitted is {omitted_text!r}") from None
    if not text:
        return Seen({}, omitted, 0)
    try:
        value = json.loads(text)
    except ValueError:
        raise BenchError(f"{service.name}: X-Feature-Flags is not JSON: {text[:300]!r}") from None
    return Seen(value if isinstance(value, dict) else {}, omitted, len(text))


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


# --- WebSocket: an echo origin and asyncio clients -----------------------------------------------


def ws_origin_main(port: int) -> int:
    """A ``websockets`` echo server: every message on any path goes back as it came; ``GET /healthz``
    (no upgrade) answers 200. No compression, no pings (the benchmark measures the tunnel)."""
    import asyncio
    from http import HTTPStatus

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    def health(connection: ServerConnection, request: Request) -> Any:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    async def main() -> None:
        async with serve(
            echo, HOST, port, process_request=health, compression=None, ping_interval=None, max_size=MIB
        ) as server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


def ws_exchange(url: str, clients: int, messages: int, timeout_s: float) -> dict[str, Any]:
    """``clients`` WebSocket connections to ``url`` (opened first, then timed): each sends its share of
    ``messages`` text messages of WS_MESSAGE_BYTES, one at a time, and awaits each echo (checked).
    Returns messages, seconds and messages/s; BenchError naming the first failing clients."""
    import asyncio

    from websockets.asyncio.client import ClientConnection, connect

    shares = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]

    async def exchange(i: int, ws: ClientConnection, count: int) -> int:
        for k in range(count):
            message = f"{i:03d}:{k:0{WS_MESSAGE_BYTES - 4}d}"[-WS_MESSAGE_BYTES:]
            await ws.send(message)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation when the
                # echo arrives at the same moment, and Ctrl-C / SIGTERM would then not stop the clients.
                async with asyncio.timeout(timeout_s):
                    echo = await ws.recv()
            except TimeoutError:
                raise BenchError(f"no echo within {timeout_s:g}s for message {k}") from None
            if echo != message:
                raise BenchError(f"message {k}: echo {str(echo)[:80]!r} instead of {message!r}")
        return count

    async def main() -> dict[str, Any]:
        opened = await asyncio.gather(
            *(
                connect(
                    url,
                    additional_headers={"X-User-Id": f"ws-{i}"},
                    compression=None,
                    proxy=None,  # never an HTTP proxy from the environment
                    ping_interval=None,
                    open_timeout=timeout_s,
                    close_timeout=min(timeout_s, 2.0),  # loopback; also bounds an interrupted run's exit
                    max_size=MIB,
                )
                for i in range(clients)
            ),
            return_exceptions=True,
        )
        conns = [c for c in opened if not isinstance(c, BaseException)]
        try:
            failed = [(i, c) for i, c in enumerate(opened) if isinstance(c, BaseException)]
            if failed:
                raise BenchError(
                    f"{len(failed)} of {clients} WebSocket connections to {url} failed; first: "
                    f"client {failed[0][0]}: {type(failed[0][1]).__name__}: {failed[0][1]}"
                )
            start = time.monotonic()
            done = await asyncio.gather(
                *(exchange(i, ws, n) for i, (ws, n) in enumerate(zip(conns, shares, strict=True))),
                return_exceptions=True,
            )
            seconds = time.monotonic() - start
            errors = [(i, e) for i, e in enumerate(done) if isinstance(e, BaseException)]
            if errors:
                first = "; ".join(f"client {i}: {type(e).__name__}: {e}" for i, e in errors[:3])
                raise BenchError(f"{len(errors)} of {clients} WebSocket clients failed: {first}")
        except BaseException:  # failed or interrupted (Ctrl-C, SIGTERM): no closing handshakes
            for c in conns:
                c.transport.abort()
            raise
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
            for c in conns:  # whatever did not close cleanly (e.g. interrupted): drop the socket
                c.transport.abort()
        return {
            "messages": messages,
            "clients": clients,
            "seconds": round(seconds, 3),
            "messages_per_s": round(messages / seconds, 1) if seconds > 0 else 0.0,
        }

    return asyncio.run(main())


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
        """One wrk -t1 run against ``BENCH_PATH`` on ``service``, plus the CPU time its process tree
        spent meanwhile: ``cpu_s`` in total and ``cpu_us`` per completed request."""
        url = service.url + BENCH_PATH
        before = cpu_seconds(service.pid)
        result = run_wrk(self.tools["wrk"], self.script, url, connections, duration_s, self.args.timeout)
        result["cpu_s"] = cpu_seconds(service.pid) - before
        requests = result["requests"]
        result["cpu_us"] = round(result["cpu_s"] * 1e6 / requests, 1) if requests else None
        return result


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def start_origin(ctx: Context) -> Service:
    port = free_port()
    body = NGINX_ORIGIN.format(host=HOST, port=port, echo=ECHO_PATH)
    origin = start_nginx(ctx.services, ctx.tools["nginx"], ctx.tmp, "origin", body, port)
    wait_ready(origin)
    return origin


def without_access_lines(text: str) -> str:
    """``text`` (a flagproxy log) without its access-log events (one JSON object per request)."""
    kept = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                if json.loads(line).get("event") == "request":
                    continue
            except ValueError:
                pass
        kept.append(line)
    return "\n".join(kept)


def access_events(service: Service) -> int:
    """Access-log events (``"event": "request"``) in ``service``'s log."""
    try:
        data = service.log.read_bytes()
    except OSError:
        return 0
    return sum(
        1 for line in data.splitlines() if b'"event": "request"' in line or b'"event":"request"' in line
    )


def log_note(service: Service, name: str) -> str | None:
    """The warning-level tail of a flagproxy log (access-log events left out), as a note, or None."""
    try:
        text = service.log.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    tail = without_access_lines(text).strip()[-1500:]
    for extra in service.extra_logs:
        with contextlib.suppress(OSError):
            tail += "\n" + extra.read_bytes().decode("utf-8", "replace").strip()[-1500:]
    tail = tail.strip()
    return f"{name} log (warnings and above, last lines):\n```\n{tail}\n```" if tail else None


def run_rounds(
    ctx: Context, systems: list[tuple[str, Service]], conns: list[int], label: str = ""
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Warm-up (discarded) per system at the largest c, then ``--rounds`` rounds: at each connection
    count every system once, the starting system rotating, so drift hits all alike."""
    args = ctx.args
    if args.warmup > 0:
        for name, service in systems:
            progress(f"{label}warm-up {name} c={max(conns)} {args.warmup:g}s (discarded)")
            ctx.wrk(service, max(conns), args.warmup)
            ctx.services.check_alive()
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(conns) * len(systems)
    done = 0
    for r in range(args.rounds):
        for c in conns:
            shift = (r + conns.index(c)) % len(systems)
            for name, service in systems[shift:] + systems[:shift]:
                done += 1
                progress(f"{label}[{done}/{total}] round {r + 1} {name} c={c} {args.duration:g}s")
                result = ctx.wrk(service, c, args.duration)
                samples.setdefault((name, c), []).append(result)
                ctx.services.check_alive()
    return samples


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

    port = free_port()
    cmd = flagproxy_cmd(origin.url, flags20, port, access_log=True)
    fp_log = ctx.services.start("flagproxy-access-log", cmd, port, "/__flags/healthz")
    systems.append((ACCESS_LOG, fp_log))

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
        systems.append((WORKERS2, fp2))
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
        if not seen.flags:
            raise BenchError(f"{name}: the origin did not receive X-Feature-Flags")
        if name.startswith("flagproxy"):
            omitted = f", X-Feature-Flags-Omitted: {seen.omitted}" if seen.omitted else ""
            ctx.notes.append(
                f"{name}: the origin received {len(seen.flags)} flags in X-Feature-Flags "
                f"({seen.header_bytes} B){omitted}"
            )
            if len(seen.flags) != args.flag_count:
                ctx.warnings.append(
                    f"{name}: {len(seen.flags)} of {args.flag_count} flags reached the origin"
                )
    events_before = access_events(fp_log)

    samples = run_rounds(ctx, systems, args.connections)

    if workers_supported:
        fp2 = dict(systems)[WORKERS2]
        tree = process_tree(fp2.pid)
        children = [f"{cmdline_label(pid)} {mib(rss_bytes(pid))}" for pid in tree[1:]]
        ctx.notes.append(
            f"{WORKERS2} after the run, RSS: supervisor {mib(rss_bytes(tree[0]))}; "
            f"children: {', '.join(children) or 'none found'}"
        )

    # The access log really logged: one event per request (the warm-up's too, hence >=).
    measured = sum(
        int(s["requests"]) for (name, _), runs in samples.items() if name == ACCESS_LOG for s in runs
    )
    time.sleep(0.2)
    events = access_events(fp_log) - events_before
    ctx.notes.append(
        f"{ACCESS_LOG}: {events:,} access-log events written to its stderr (a file in the temp dir) "
        f"during the runs; wrk completed {measured:,} requests in the measured runs"
    )
    if events < measured:
        ctx.warnings.append(f"{ACCESS_LOG}: only {events:,} access-log events for {measured:,} requests")
    ctx.notes.append(
        "observers: the metrics and budget observers are always on in flagproxy (there is no switch), so "
        f"every flagproxy row pays for them; the `{ACCESS_LOG}` row adds the access-log observer (one JSON "
        "log line per request), so its CPU µs/request minus the flagproxy row's is that observer's cost"
    )

    for name, service in systems[1:]:
        note = log_note(service, name)
        if note:
            ctx.notes.append(note)
    for _, service in systems[1:]:
        ctx.services.stop(service)
    return [aggregate(name, c, samples[(name, c)]) for c in args.connections for name, _ in systems]


def phase_flags(ctx: Context) -> list[FlagRow]:
    """One flagproxy per flag count, started one after another, then alternating wrk runs at c=32 (the
    same warm-up and rounds as phase 1), medians over rounds."""
    args = ctx.args
    origin = ctx.origin
    assert origin is not None
    systems: list[tuple[str, Service]] = []
    counts: dict[str, int] = {}
    seen: dict[str, Seen] = {}
    for n in args.flag_counts:  # one after another, so that each ready time is its own
        flags = write_flags(ctx.tmp / f"flags-{n}.json", n)
        port = free_port()
        cmd = flagproxy_cmd(origin.url, flags, port)
        service = ctx.services.start(f"flagproxy-{n}-flags", cmd, port, "/__flags/healthz")
        name = f"flagproxy {n:,} flags"
        ready_s = wait_ready(service, timeout_s=120)
        systems.append((name, service))
        counts[name] = n
        status, body = http_get(service.url + BENCH_PATH, {"X-User-Id": "1"})
        if status != 200:
            raise BenchError(f"{name}: GET {BENCH_PATH} answered {status}: {body[:300]!r}")
        seen[name] = s = flags_seen(service)
        if not s.accounts_for(n):
            ctx.warnings.append(
                f"{name}: the origin received {len(s.flags)} flags and X-Feature-Flags-Omitted: {s.omitted}, "
                f"which does not account for all {n} flags (they all apply to {BENCH_PATH})"
            )
        ctx.notes.append(
            f"{name}: ready in {ready_s:.1f}s, RSS {mib(rss_bytes(service.pid))} before traffic; the origin "
            f"received {len(s.flags)} flags ({s.header_bytes:,} B), X-Feature-Flags-Omitted: {s.omitted}"
        )

    samples = run_rounds(ctx, systems, [FLAGS_CONNECTIONS], label="flags: ")
    out = []
    for name, service in systems:
        s = seen[name]
        row = aggregate(name, FLAGS_CONNECTIONS, samples[(name, FLAGS_CONNECTIONS)])
        out.append(
            FlagRow(counts[name], row, rss_bytes(service.pid), len(s.flags), s.omitted, s.header_bytes)
        )
    for name, service in systems:
        note = log_note(service, name)
        if note:
            ctx.notes.append(note)
        ctx.services.stop(service)
    return out


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
    seen = flags_seen(fp)
    if not seen.accounts_for(args.rss_flags):
        ctx.warnings.append(
            f"RSS phase: the origin received {len(seen.flags)} flags and X-Feature-Flags-Omitted: "
            f"{seen.omitted}, which does not account for all {args.rss_flags} flags on {ECHO_PATH}"
        )
    traffic_s = min(args.duration, 3.0)
    progress(f"RSS: {args.rss_flags} flags loaded, {traffic_s:g}s of traffic at c=32 on {BENCH_PATH}")
    result = ctx.wrk(fp, 32, traffic_s)
    time.sleep(0.5)
    after_traffic = rss_bytes(fp.pid)
    ctx.services.check_alive()
    errors = sum(result["errors"].values())
    if errors:
        ctx.warnings.append(f"RSS phase ({args.rss_flags} flags): wrk errors {result['errors']}")
    if result["requests"] - errors < 100:
        ctx.warnings.append(f"RSS phase: only {result['requests']} requests completed, {errors} errors")
    note = log_note(fp, f"flagproxy with {args.rss_flags} flags")
    if note:
        ctx.notes.append(note)
    ctx.notes.append(
        f"flagproxy with {args.rss_flags} flags: ready in {ready_s:.1f}s; {len(seen.flags)} flags "
        f"reached the origin after budget trimming (X-Feature-Flags-Omitted: {seen.omitted}); "
        f"{result['rps']:,.0f} req/s, p50 {result['p50_us']:,} µs, "
        f"{result['cpu_us'] or 0:,.0f} CPU µs/request at c=32"
    )
    ctx.services.stop(fp)
    return {
        "flags": args.rss_flags,
        "ready_s": round(ready_s, 2),
        "rss_after_start": after_start,
        "rss_after_traffic": after_traffic,
        "traffic_requests": result["requests"],
        "traffic_rps": round(result["rps"], 1),
        "traffic_p50_us": result["p50_us"],
        "traffic_cpu_us": result["cpu_us"],
        "traffic_errors": result["errors"],
        "flags_in_header": len(seen.flags),
        "omitted_header": seen.omitted,
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


def phase_ws(ctx: Context, flags20: Path) -> dict[str, Any]:
    """WebSocket echo through flagproxy: messages/s, the proxy's CPU per message and its RSS before,
    at the peak and after; the same exchange straight to the origin first, for comparison."""
    args = ctx.args
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ws-origin", str(port)]
    worigin = ctx.services.start("ws-origin", cmd, port, "/healthz")
    wait_ready(worigin)
    port = free_port()
    fp = ctx.services.start(
        "flagproxy-ws", flagproxy_cmd(worigin.url, flags20, port), port, "/__flags/healthz"
    )
    wait_ready(fp)
    direct_url = f"ws://{HOST}:{worigin.url.rsplit(':', 1)[1]}{WS_PATH}"
    proxy_url = f"ws://{HOST}:{port}{WS_PATH}"
    clients, messages, timeout_s = args.ws_clients, args.ws_messages, args.ws_timeout

    def exchange(url: str, count: int, who: Service) -> dict[str, Any]:
        try:
            return ws_exchange(url, clients, count, timeout_s)
        except (OSError, BenchError) as exc:
            raise BenchError(
                f"WebSocket echo via {url} ({clients} clients, {count} messages) failed: {exc}\n"
                f"{who.name} log tail:\n{who.log_tail()}\nws-origin log tail:\n{worigin.log_tail()}"
            ) from None

    progress(f"ws: {clients} clients x {messages:,} messages straight to the echo origin")
    direct = exchange(direct_url, messages, worigin)
    # Warm the tunnel code paths, then take the baseline once those connections are closed.
    exchange(proxy_url, clients * 20, fp)
    ctx.services.check_alive()
    time.sleep(0.3)
    before = rss_bytes(fp.pid)
    progress(f"ws: {clients} clients x {messages:,} messages of {WS_MESSAGE_BYTES} B through flagproxy")
    cpu_before = cpu_seconds(fp.pid)
    with PeakSampler(fp.pid) as sampler:
        result = exchange(proxy_url, messages, fp)
    cpu_s = cpu_seconds(fp.pid) - cpu_before
    ctx.services.check_alive()
    time.sleep(0.3)
    after = rss_bytes(fp.pid)
    note = log_note(fp, "flagproxy (WebSocket)")
    if note:
        ctx.notes.append(note)
    ctx.services.stop(fp)
    ctx.services.stop(worigin)
    return {
        **result,
        "message_bytes": WS_MESSAGE_BYTES,
        "cpu_us_per_message": round(cpu_s * 1e6 / messages, 1),
        "direct_messages_per_s": direct["messages_per_s"],
        "rss_before": before,
        "rss_peak": sampler.peak,
        "rss_after": after,
        "peak_growth": sampler.peak - before,
    }


# --- output ---------------------------------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else ""


def cpu_cell(cpu_us: float | None) -> str:
    return f"{cpu_us:,.0f}" if cpu_us is not None else ""


def markdown_table(rows: list[Row]) -> str:
    by = {(r.system, r.connections): r for r in rows}
    lines = [
        "| system | c | req/s | CPU µs/req | p50 µs | p99 µs | errors | vs nginx | vs naive "
        "| added p50 vs direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        nginx = by.get(("nginx", r.connections))
        naive = by.get(("naive", r.connections))
        direct = by.get(("direct", r.connections))
        added = f"{r.p50_us - direct.p50_us:+,.0f} µs" if direct and r.system != "direct" else ""
        errors = f"**{r.error_count}**" if r.error_count else "0"
        lines.append(
            f"| {r.system} | {r.connections} | {r.rps:,.0f} | {cpu_cell(r.cpu_us)} | {r.p50_us:,.0f} "
            f"| {r.p99_us:,.0f} | {errors} "
            f"| {ratio(r.rps, nginx.rps if nginx else None) if r.system != 'nginx' else ''} "
            f"| {ratio(r.rps, naive.rps if naive else None) if r.system != 'naive' else ''} | {added} |"
        )
    return "\n".join(lines)


def flag_base(flag_rows: list[FlagRow]) -> FlagRow | None:
    """The row the flag-count ratios refer to: 20 flags, else the smallest count."""
    if not flag_rows:
        return None
    return next((f for f in flag_rows if f.flags == FLAG_BASE), min(flag_rows, key=lambda f: f.flags))


def flag_table(flag_rows: list[FlagRow]) -> str:
    base = flag_base(flag_rows)
    assert base is not None
    lines = [
        f"| flags | req/s (c={FLAGS_CONNECTIONS}) | CPU µs/req | p50 µs | p99 µs | errors "
        f"| vs {base.flags} flags | CPU vs {base.flags} flags | RSS after | flags at origin | Omitted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in sorted(flag_rows, key=lambda f: f.flags):
        r = f.row
        errors = f"**{r.error_count}**" if r.error_count else "0"
        cpu_ratio = ratio(r.cpu_us, base.row.cpu_us) if r.cpu_us is not None else ""
        lines.append(
            f"| {f.flags:,} | {r.rps:,.0f} | {cpu_cell(r.cpu_us)} | {r.p50_us:,.0f} | {r.p99_us:,.0f} "
            f"| {errors} | {ratio(r.rps, base.row.rps)} | {cpu_ratio} | {mib(f.rss_after)} "
            f"| {f.flags_in_header} | {f.omitted_header} |"
        )
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[str]:
    """The target lines (met / **missed**), then lines without a target (ratios, observer cost)."""
    rows: list[Row] = result["rows"]
    flag_rows: list[FlagRow] = result.get("flag_rows") or []
    rss, stream, ws = result.get("rss"), result.get("stream"), result.get("ws")
    by = {(r.system, r.connections): r for r in rows}
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def cpu(r: Row) -> str:
        return f"{r.cpu_us:,.0f} CPU µs/request" if r.cpu_us is not None else "CPU n/a"

    fp32, nginx32 = by.get(("flagproxy", 32)), by.get(("nginx", 32))
    if fp32 and nginx32 and nginx32.rps:
        x = fp32.rps / nginx32.rps
        out.append(
            f"c=32 flagproxy (1 worker, {result['flag_count']} flags, budget on) / nginx proxy_pass = "
            f"{x:.2f}x (target >= {TARGET_VS_NGINX:.2f}x): {verdict(x >= TARGET_VS_NGINX)}"
        )
    fp1, direct1 = by.get(("flagproxy", 1)), by.get(("direct", 1))
    if fp1 and direct1:
        added = fp1.p50_us - direct1.p50_us
        out.append(
            f"c=1 flagproxy p50 - direct p50 = {added:+,.0f} µs (target <= {TARGET_ADDED_P50_US:g} µs): "
            f"{verdict(added <= TARGET_ADDED_P50_US)}"
        )
    base = flag_base(flag_rows)
    if base is not None:
        for f in sorted(flag_rows, key=lambda f: f.flags):
            if f is base or not base.row.rps:
                continue
            x = f.row.rps / base.row.rps
            goal = TARGET_FLAG_RATIOS.get(f.flags) if base.flags == FLAG_BASE else None
            tail = f"(target >= {goal:g}x): {verdict(x >= goal)}" if goal is not None else "(no target)"
            out.append(
                f"c={FLAGS_CONNECTIONS} flagproxy {f.flags:,} flags / {base.flags} flags = {x:.2f}x req/s, "
                f"{cpu(f.row)} vs {cpu(base.row)} {tail}"
            )
    if rss:
        after = rss["rss_after_traffic"]
        out.append(
            f"RSS of one worker with {rss['flags']:,} flags after traffic: {after / 1e6:,.1f} MB "
            f"(after startup {rss['rss_after_start'] / 1e6:,.1f} MB; {rss['traffic_requests']:,} requests "
            f"on {BENCH_PATH}; target <= {TARGET_RSS_BYTES / 1e6:g} MB): {verdict(after <= TARGET_RSS_BYTES)}"
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
    if ws:
        through = (
            f"{ws['messages_per_s']:,.0f} messages/s (straight to the origin: "
            f"{ws['direct_messages_per_s']:,.0f}/s), {ws['cpu_us_per_message']:,.0f} proxy CPU µs/round trip"
        )
        memory = (
            f"RSS {mib(ws['rss_before'])} -> peak {mib(ws['rss_peak'])}, after {mib(ws['rss_after'])}: "
            f"peak growth {mib(ws['peak_growth'])}"
        )
        out.append(
            f"WebSocket echo, {ws['clients']} clients, {ws['messages']:,} messages of "
            f"{ws['message_bytes']} B through flagproxy: {through}; {memory} "
            f"(target <= {mib(TARGET_WS_GROWTH)}, flat memory): "
            f"{verdict(ws['peak_growth'] <= TARGET_WS_GROWTH)}"
        )

    # No targets: ratios and costs to read beside the above.
    for c in dict.fromkeys(r.connections for r in rows):
        fp, logged = by.get(("flagproxy", c)), by.get((ACCESS_LOG, c))
        if fp and logged and fp.cpu_us is not None and logged.cpu_us is not None:
            out.append(
                f"c={c} access-log observer cost: {logged.cpu_us - fp.cpu_us:+,.1f} CPU µs/request "
                f"({cpu(logged)} with --access-log vs {cpu(fp)} without; req/s {ratio(logged.rps, fp.rps)}; "
                "no target)"
            )
    w2 = by.get((WORKERS2, 32))
    if fp32 and w2 and fp32.rps:
        out.append(
            f"c=32 {WORKERS2} / 1 worker = {w2.rps / fp32.rps:.2f}x req/s, {cpu(w2)} vs {cpu(fp32)} "
            "(no target; the cores are shared)"
        )
    for c in dict.fromkeys(r.connections for r in rows):
        fp, base_row = by.get(("flagproxy", c)), by.get((BASELINE, c))
        if fp and base_row and base_row.rps:
            out.append(
                f"c={c} flagproxy / {BASELINE} = {fp.rps / base_row.rps:.2f}x "
                f"(req/s; p50 {fp.p50_us:,.0f} vs {base_row.p50_us:,.0f} µs; {cpu(fp)} vs {cpu(base_row)}; "
                "no target)"
            )
    top = max(flag_rows, key=lambda f: f.flags) if flag_rows else None
    if top is not None:
        out.append(
            f"at {top.flags:,} flags the origin received {top.flags_in_header} flags in X-Feature-Flags "
            f"({top.header_bytes:,} B) and X-Feature-Flags-Omitted: {top.omitted_header} (no target)"
        )
    return out


# --- main -----------------------------------------------------------------------------------------

QUICK = {"rounds": 1, "duration": 2.0, "warmup": 1.0, "ws_messages": 5000, "stream_mib": 64}
FULL = {"rounds": 3, "duration": 5.0, "warmup": 2.0, "ws_messages": 100_000, "stream_mib": 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="nginx direct / nginx proxy_pass / naive Starlette+httpx / flagproxy, side by side."
    )
    p.add_argument("--duration", type=positive_float, help="seconds per wrk run (default 5; --quick 2)")
    p.add_argument(
        "--rounds", type=positive_int, help="rounds; the table shows medians (default 3; --quick 1)"
    )
    p.add_argument(
        "--connections", type=parse_connections, default=[1, 32], help="comma-separated (default 1,32)"
    )
    p.add_argument("--warmup", type=float, help="discarded warm-up seconds per system (default 2; --quick 1)")
    p.add_argument("--timeout", type=positive_float, default=2.0, help="wrk per-request timeout (default 2s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller defaults to try the harness: 1 round of 2 s, 1 s warm-up, --ws-messages 5000, "
        "--stream-mib 64 (options given explicitly still win)",
    )
    p.add_argument(
        "--flag-count", type=positive_int, default=20, help="flags resolved per request (default 20)"
    )
    p.add_argument(
        "--flag-counts",
        type=lambda text: parse_counts(text, "flag counts"),
        default=[20, 200, 1000, 5000],
        help="flag-count phase: one flagproxy per count (default 20,200,1000,5000)",
    )
    p.add_argument(
        "--rss-flags", type=positive_int, default=5000, help="flags for the RSS check (default 5000)"
    )
    p.add_argument("--stream-mib", type=positive_int, help="MiB up and down (default 1024; --quick 64)")
    p.add_argument("--stream-timeout", type=positive_float, default=60.0, help="socket silence limit, s")
    p.add_argument(
        "--ws-messages", type=positive_int, help="WebSocket messages in total (default 100000; --quick 5000)"
    )
    p.add_argument("--ws-clients", type=positive_int, default=32, help="WebSocket clients (default 32)")
    p.add_argument(
        "--ws-timeout", type=positive_float, default=10.0, help="WebSocket connect/echo limit, s (default 10)"
    )
    p.add_argument("--skip-flags", action="store_true", help="skip the flag-count phase")
    p.add_argument("--skip-rss", action="store_true", help="skip the 5,000-flag RSS check")
    p.add_argument("--skip-stream", action="store_true", help="skip the 1 GiB upload/download check")
    p.add_argument("--skip-ws", action="store_true", help="skip the WebSocket echo phase")
    p.add_argument("--no-install", action="store_true", help="never apt-get install nginx-light / wrk")
    p.add_argument("--json", metavar="FILE", help="also write meta, rows, RSS and notes as JSON")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help=f"also run flagproxy from this other checkout (e.g. a clone of an older commit) as {BASELINE!r}",
    )
    p.add_argument("--stream-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)  # internal
    p.add_argument("--ws-origin", type=int, metavar="PORT", help=argparse.SUPPRESS)  # internal
    return p


def run(args: argparse.Namespace, tools: dict[str, str], tmp: Path, services: Services) -> dict[str, Any]:
    script = tmp / "report.lua"
    script.write_text(WRK_SCRIPT)
    ctx = Context(args, tools, tmp, services, str(script))
    flags20 = write_flags(tmp / f"flags-{args.flag_count}.json", args.flag_count)
    help_text = serve_help()
    workers_supported = "--workers" in help_text
    if "--access-log" not in help_text:
        raise BenchError("`flagproxy serve --help` lists no --access-log: the observer-cost row needs it")
    if args.baseline_tree is not None:
        imported = check_baseline_tree(args.baseline_tree)
        rev = git_revision(args.baseline_tree)
        ctx.notes.append(
            f"{BASELINE}: git {rev}; `import proxy` with its cwd and PYTHONPATH loads {imported}"
        )
    ctx.origin = start_origin(ctx)
    rows = phase_throughput(ctx, flags20, workers_supported)
    out: dict[str, Any] = {"rows": rows, "flag_count": args.flag_count}
    phases = [
        ("flag_rows", "flag-count", args.skip_flags, lambda: phase_flags(ctx)),
        ("rss", "RSS", args.skip_rss, lambda: phase_rss(ctx)),
        ("stream", "streaming", args.skip_stream, lambda: phase_stream(ctx, flags20)),
        ("ws", "WebSocket", args.skip_ws, lambda: phase_ws(ctx, flags20)),
    ]
    for key, label, skip, call in phases:
        out[key] = None
        if skip:
            continue
        try:
            out[key] = call()
        except BenchError as exc:  # keep the other results; report the failure
            ctx.warnings.append(f"{label} phase failed: {exc}")
            services.stop_all_but(ctx.origin)
    all_rows = rows + [f.row for f in out["flag_rows"] or []]
    for r in all_rows:
        if r.error_count:
            ctx.warnings.append(
                f"{r.system} c={r.connections}: errors {r.errors} over {r.rounds} run(s) "
                "(status = non-2xx/3xx responses; connect/read/write/timeout = socket errors)"
            )
    return {**out, "notes": ctx.notes, "warnings": ctx.warnings}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stream_origin is not None:
        return stream_origin_main(args.stream_origin)
    if args.ws_origin is not None:
        return ws_origin_main(args.ws_origin)
    if args.baseline_tree is not None:
        args.baseline_tree = args.baseline_tree.resolve()
        if not (args.baseline_tree / "proxy" / "__init__.py").is_file():
            parser.error(f"--baseline-tree {args.baseline_tree}: no proxy/__init__.py there")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not Path("/proc/self/status").exists():
        print("bench: needs Linux (/proc) for RSS and CPU sampling", file=sys.stderr)
        return 2
    if not args.skip_ws:
        try:
            import websockets  # noqa: F401  (the WebSocket phase's client and origin)
        except ImportError:
            print(
                "bench: the WebSocket phase needs `websockets` (pip install websockets) or --skip-ws",
                file=sys.stderr,
            )
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
    flag_rows: list[FlagRow] = result["flag_rows"] or []
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "git": git_revision(),
        "wrk": tool_version([tools["wrk"], "--version"]),
        "nginx": tool_version([tools["nginx"], "-v"]).removeprefix("nginx version: "),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "clk_tck": CLK_TCK,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "path": BENCH_PATH,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "quick": args.quick,
        "connections": args.connections,
        "flags_per_request": args.flag_count,
        "flag_counts": args.flag_counts,
        "rss_flags": args.rss_flags,
        "stream_mib": args.stream_mib,
        "ws_messages": args.ws_messages,
        "ws_clients": args.ws_clients,
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
        f"{meta['nginx']}, {meta['wrk']}, Python {meta['python']}; CPU µs/req = utime+stime of the "
        "server's process tree (from /proc) over the requests wrk completed\n"
    )
    print(markdown_table(rows))
    if flag_rows:
        print(f"\nFlag count (one flagproxy per count, c={FLAGS_CONNECTIONS}, same rounds):\n")
        print(flag_table(flag_rows))
    print()
    target_lines = targets(result)
    for line in target_lines:
        print(f"- {line}")
    for line in result["warnings"]:
        print(f"- WARNING: {line}")
    for line in result["notes"]:
        print(f"- {line}")

    if args.json:
        report = {
            "meta": meta,
            "rows": [asdict(r) for r in rows],
            "flag_rows": [f.as_json() for f in flag_rows],
            "rss": result["rss"],
            "stream": result["stream"],
            "ws": result["ws"],
            "targets": target_lines,
            "warnings": result["warnings"],
            "notes": result["notes"],
        }
        write_json(args.json, report)
    return 1 if result["warnings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
