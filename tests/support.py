"""Reusable end-to-end helpers: a raw scripted origin, the real proxy as a subprocess, a raw client.

Everything listens on 127.0.0.1 only. Nothing here mocks the proxy or the origin: the origin is a
real HTTP/1.1 server on a real socket, the proxy is the real ``flagproxy serve`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import uvicorn

from proxy.dataplane.client_side import ClientConnection

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


# --- deterministic large payloads, generated on the fly ---------------------------------------------

_BLOCK = random.Random(20240601).randbytes(1 << 20)


def pattern_chunks(total: int, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """``total`` pseudo-random bytes in chunks, never more than one chunk in memory."""
    offset = 0
    size = len(_BLOCK)
    while offset < total:
        n = min(chunk_size, total - offset)
        start = offset % size
        if start + n <= size:
            yield _BLOCK[start : start + n]
        else:
            yield _BLOCK[start:] + _BLOCK[: n - (size - start)]
        offset += n


def pattern_digest(total: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(total, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


# --- the raw scripted origin ------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request exactly as the origin received it."""

    head: bytes  # request line + header lines + the blank line, byte for byte
    request_line: bytes
    method: str
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # as received: original case, original order, duplicates kept
    connection_id: int
    body: bytes | None = None  # kept only up to RawOrigin.keep_body_limit bytes
    body_length: int = 0
    body_sha256: str = ""
    chunked: bool = False
    complete: bool = False  # False when the peer went away in the middle of the body

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def names(self) -> list[str]:
        """Header names, lower case, in order received (duplicates kept)."""
        return [n.decode("latin-1").lower() for n, _ in self.headers]

    def values(self, name: str) -> list[str]:
        lname = name.lower().encode("latin-1")
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == lname]

    def value(self, name: str) -> str | None:
        """The single value of ``name`` (None if absent); fails if the header was sent twice."""
        values = self.values(name)
        assert len(values) <= 1, f"header {name} received {len(values)} times: {values}"
        return values[0] if values else None


class OriginConnection:
    """What a scripted handler gets to answer with: the raw connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_after = False

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_peer_closed(self) -> None:
        """Block until the peer closes the connection (what a never-answering origin does)."""
        while await self.reader.read(65536):
            pass


Handler = Callable[[RecordedRequest, OriginConnection], Awaitable[None]]
Reply = bytes | Handler


def http_response(
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    reason: str = "Whatever",
    content_length: bool = True,
) -> bytes:
    """A raw HTTP/1.1 response; Content-Length is added unless asked not to."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if content_length and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked_response(status: int, headers: Sequence[tuple[str, str]], chunks: Iterable[bytes]) -> bytes:
    head = http_response(status, [*headers, ("Transfer-Encoding", "chunked")], content_length=False)
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return head + body + b"0\r\n\r\n"


def streamed(
    total: int,
    chunk_size: int = 1 << 16,
    chunked: bool = False,
    headers: Sequence[tuple[str, str]] = (),
) -> Handler:
    """A handler streaming ``pattern_chunks(total)``, generated while sending (never held whole)."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(total))]
        await conn.send(http_response(200, [*headers, *framing], content_length=False))
        for chunk in pattern_chunks(total, chunk_size):
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            await conn.send(b"0\r\n\r\n")

    return handler


def trickle(chunk: bytes = b"x" * 4096, interval_s: float = 0.01) -> Handler:
    """A chunked response that never ends: one chunk every ``interval_s`` until the peer goes away."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(http_response(200, [("Transfer-Encoding", "chunked")], content_length=False))
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        while not conn.reader.at_eof():
            await conn.send(frame)
            await asyncio.sleep(interval_s)  # pacing of the data, not synchronisation
        conn.close_after = True

    return handler


def stall_after_first_chunk(chunk: bytes = b"s" * 4096) -> Handler:
    """Headers and one chunk of a chunked body, then silence until the peer goes away."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(http_response(200, [("Transfer-Encoding", "chunked")], content_length=False))
        await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await conn.wait_peer_closed()
        conn.close_after = True

    return handler


def never_reply() -> Handler:
    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.wait_peer_closed()
        conn.close_after = True

    return handler


def close_without_reply() -> Handler:
    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        conn.close_after = True

    return handler


def body_report() -> Handler:
    """Answers with what the origin received: ``{"length": n, "sha256": "..."}``."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        body = json.dumps({"length": request.body_length, "sha256": request.body_sha256}).encode()
        await conn.send(http_response(200, [("Content-Type", "application/json")], body))

    return handler


class RawOrigin:
    """An HTTP/1.1 origin on raw asyncio streams in a background thread, scripted per path prefix.

    Every request is recorded (``requests``) before it is answered; answers come from ``route()``
    (longest matching path prefix; raw bytes or an async handler), else ``default``.
    """

    def __init__(self, keep_body_limit: int = 1 << 20) -> None:
        self.keep_body_limit = keep_body_limit
        self.send_100_continue = True  # answer ``Expect: 100-continue`` like a compliant server
        self.default: Reply = http_response(200, [("Content-Type", "text/plain")], b"ok")
        self.routes: dict[str, Reply] = {}
        self.requests: list[RecordedRequest] = []
        self.open_connections = 0
        self.total_connections = 0
        self.heads_received = 0
        self.changed = threading.Condition()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    # public API (test thread) -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def route(self, prefix: str, reply: Reply) -> None:
        self.routes[prefix] = reply

    def requests_to(self, path: str) -> list[RecordedRequest]:
        raw = path.encode("latin-1")
        with self.changed:
            return [r for r in self.requests if r.path == raw]

    def only_request_to(self, path: str) -> RecordedRequest:
        found = self.requests_to(path)
        assert len(found) == 1, f"expected exactly one request to {path}, origin saw {len(found)}"
        return found[0]

    def wait_until(self, predicate: Callable[[RawOrigin], bool], timeout: float = 5.0) -> bool:
        """Wait for a state change (connections, heads, requests) that makes ``predicate`` true."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def start(self) -> RawOrigin:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, LOCALHOST, 0, limit=1 << 20)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="raw-origin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> RawOrigin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # server side (origin thread) --------------------------------------------------------------------

    def _bump(self, **deltas: int) -> None:
        with self.changed:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            self.changed.notify_all()

    def _pick(self, path: bytes) -> Reply:
        text = path.decode("latin-1")
        best = None
        for prefix in self.routes:
            if text.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return self.default if best is None else self.routes[best]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.changed:
            self.total_connections += 1
            self.open_connections += 1
            connection_id = self.total_connections
            self.changed.notify_all()
        self._writers.add(writer)
        try:
            while await self._one_request(connection_id, reader, writer):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a handler task that was cancelled)
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._bump(open_connections=-1)

    async def _one_request(
        self, connection_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read, record and answer one request; False when the connection should end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        request = RecordedRequest(
            head=head,
            request_line=lines[0],
            method=method.decode("latin-1"),
            target=target,
            version=version,
            headers=headers,
            connection_id=connection_id,
        )
        self._bump(heads_received=1)
        lowered = {n.lower(): v for n, v in headers}
        request.chunked = b"chunked" in lowered.get(b"transfer-encoding", b"").lower()
        if self.send_100_continue and lowered.get(b"expect", b"").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            await self._read_body(request, reader, int(lowered.get(b"content-length", b"0")))
        finally:
            with self.changed:
                self.requests.append(request)
                self.changed.notify_all()

        conn = OriginConnection(reader, writer)
        reply = self._pick(request.path)
        if isinstance(reply, bytes):
            writer.write(reply)
            await writer.drain()
        else:
            await reply(request, conn)
        wants_close = lowered.get(b"connection", b"").lower() == b"close"
        return not (conn.close_after or wants_close)

    async def _read_body(self, request: RecordedRequest, reader: asyncio.StreamReader, length: int) -> None:
        digest = hashlib.sha256()
        kept = bytearray()

        def take(data: bytes) -> None:
            digest.update(data)
            request.body_length += len(data)
            if len(kept) + len(data) <= self.keep_body_limit:
                kept.extend(data)

        async def exactly(n: int) -> None:
            while n > 0:
                data = await reader.read(min(n, 1 << 18))
                if not data:
                    raise asyncio.IncompleteReadError(b"", n)
                take(data)
                n -= len(data)

        if request.chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, ignored
                        pass
                    break
                await exactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise ValueError("bad chunk terminator")
        else:
            await exactly(length)
        request.complete = True
        request.body_sha256 = digest.hexdigest()
        request.body = bytes(kept) if request.body_length <= self.keep_body_limit else None


# --- the real proxy as a subprocess -----------------------------------------------------------------


class ProxyProcess:
    """``python -m proxy serve`` on a free port, with its own temp config, flags file and env."""

    def __init__(
        self,
        origins: Sequence[str] = (),
        *,
        config: str | None = None,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log_level: str = "warning",
        tmp_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 20.0,
        control_port: int = 0,
    ) -> None:
        self.origins = list(origins)
        self.control_port = control_port  # [server] control_port: the probes are there
        self.config = config
        self.flags = dict(flags) if flags is not None else {"flags": {}}
        self.env = dict(env or {})
        self.args = list(args)
        self.log_level = log_level
        self._own_tmp = tmp_dir is None
        self.tmp_dir = Path(tmp_dir if tmp_dir is not None else tempfile.mkdtemp(prefix="flagproxy-"))
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.tmp_dir / "proxy.stderr"

    @property
    def base_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        flags_path = self.tmp_dir / "flags.json"
        flags_path.write_text(json.dumps(self.flags))
        cmd = [PYTHON, "-m", "proxy", "serve", "--log-level", self.log_level]
        cmd += ["--host", LOCALHOST, "--port", str(self.port), "--flags", str(flags_path)]
        if self.config is not None:
            config_path = self.tmp_dir / "flagproxy.toml"
            config_path.write_text(self.config)
            cmd += ["--config", str(config_path)]
        for origin in self.origins:
            cmd += ["--origin", origin]
        if not self.flags.get("flags"):
            cmd.append("--allow-empty")  # asked for: serve refuses to start with no flags otherwise
        return cmd + self.args

    def start(self) -> ProxyProcess:
        # experiment data in the test's own directory, never in the checkout's .flagproxy/
        env = clean_env({"FLAGPROXY_EXPERIMENTS_PATH": str(self.tmp_dir / "experiments.sqlite3"), **self.env})
        if self.control_port:
            env["FLAGPROXY_SERVER_CONTROL_PORT"] = str(self.control_port)
        probe = f"http://{LOCALHOST}:{self.control_port or self.port}/__flags/healthz"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"flagproxy exited with {self.process.returncode} during startup:\n{self.stderr()}"
                    )
                try:
                    if client.get(probe).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"flagproxy not ready after {self.startup_timeout_s}s:\n{self.stderr()}"
                    )
                time.sleep(0.05)  # readiness polling of a subprocess, bounded by the deadline

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._own_tmp:
            for path in self.tmp_dir.iterdir():
                path.unlink()
            self.tmp_dir.rmdir()
            self._own_tmp = False

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The current environment without FLAGPROXY_* or a metrics directory leaking in from the shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLAGPROXY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(extra)
    return env


def run_serve(
    args: Sequence[str], env: Mapping[str, str] = {}, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m proxy serve ARGS`` to completion (for startup failures)."""
    return subprocess.run(
        [PYTHON, "-m", "proxy", "serve", *args],
        cwd=REPO,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- a raw HTTP/1.1 client --------------------------------------------------------------------------


@dataclass
class RawResponse:
    head: bytes
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def names(self) -> list[str]:
        return [n.lower() for n, _ in self.headers]

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def value(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, f"header {name} received {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class SocketReader:
    """Reads off one client socket, keeping what is left over for the next read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self.fill():
                raise ConnectionError(f"connection closed before {marker!r}: got {self.buffer[:200]!r}")
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self.fill():
                raise ConnectionError(f"connection closed after {len(self.buffer)} of {n} bytes")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def chunked_body(self) -> bytes:
        """A chunked body (the head already read): the chunks joined, trailer fields skipped."""
        parts = []
        while True:
            size = int(self.until(b"\r\n").split(b";")[0].strip(), 16)
            if size == 0:
                while self.until(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            assert self.exactly(2) == b"\r\n", "bad chunk terminator"


_READERS: weakref.WeakKeyDictionary[socket.socket, SocketReader] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, method: str = "GET") -> RawResponse:
    """Read one response from ``sock``: Content-Length, chunked, or until close. What was read past
    it (a pipelined or interim response that came in the same recv) stays for the next call."""
    reader = _READERS.get(sock)
    if reader is None:
        reader = _READERS[sock] = SocketReader(sock)
    head = reader.until(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    response = RawResponse(head=head, status=status, headers=headers)
    lowered = {n.lower(): v for n, v in headers}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return response
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        response.body = reader.chunked_body()
    elif "content-length" in lowered:
        response.body = reader.exactly(int(lowered["content-length"]))
    else:
        response.body = reader.rest()
    return response


def raw_exchange(port: int, request: bytes, source: str = LOCALHOST, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` byte for byte to 127.0.0.1:``port`` from ``source`` (a loopback address) over a
    fresh connection and read one response."""
    method = request.split(b" ", 1)[0].decode("latin-1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((LOCALHOST, port))
        sock.sendall(request)
        return read_response(sock, method)


def raw_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    host: str | None = "test.example",
) -> bytes:
    """Exact request bytes: only the headers given (plus Host unless ``host`` is None)."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RssSampler:
    """Samples a process's RSS in a background thread; ``peak`` is the highest value seen."""

    def __init__(self, proxy: ProxyProcess, interval_s: float = 0.02) -> None:
        self.proxy = proxy
        self.interval_s = interval_s
        self.baseline = proxy.rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.proxy.rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.proxy.rss_bytes())


# --- a private Redis ---------------------------------------------------------------------------------

REDIS_SERVER = "redis-server"


class RedisServer:
    """A private ``redis-server`` on a free 127.0.0.1 port, without persistence.

    Never the machine's shared instance: each one has its own port and working directory, so
    ``restart()`` (same port) brings it back EMPTY, like a Redis that lost its data.
    """

    def __init__(self, port: int | None = None, dir: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = dir is None
        self.dir = Path(dir if dir is not None else tempfile.mkdtemp(prefix="flagproxy-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"
        self._clients: list[Any] = []

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", LOCALHOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert not self.running, "already running"
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_accepting(timeout)
        return self

    def wait_accepting(self, timeout: float = 10.0) -> None:
        """Bounded polling of PING until the server answers (fails if it exits or the deadline passes)."""
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            probe = redis.Redis(
                host=LOCALHOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            try:
                if probe.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                probe.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} not answering after {timeout}s")
            time.sleep(0.02)  # readiness polling of a subprocess, bounded by the deadline

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, falling back to SIGKILL; returns once the process is gone."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            # Raw RESP: redis-py would retry the command when the server (as asked) drops the connection.
            with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, self.port), 2) as sock:
                sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
                sock.recv(1024)  # EOF once the server is going away
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-conversation, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Same port, and EMPTY (no persistence)."""
        self.stop()
        return self.start(timeout)

    def client(self, decode: bool = True) -> Any:
        """A sync ``redis.Redis`` client (closed by ``close()``); ``decode=False`` for DUMP."""
        import redis

        client = redis.Redis(
            host=LOCALHOST,
            port=self.port,
            decode_responses=decode,
            socket_timeout=5,
            socket_connect_timeout=3,
        )
        self._clients.append(client)
        return client

    def dump_namespace(self, pattern: str) -> dict[bytes, bytes | None]:
        """Every key matching ``pattern`` with its DUMP serialisation: byte-for-byte state."""
        raw = self.client(decode=False)
        return {key: raw.dump(key) for key in sorted(raw.scan_iter(match=pattern, count=1000))}

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self.stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self._own_dir = False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_namespaces = itertools.count(1)


def unique_namespace(hint: str) -> str:
    """A fresh ``[store] environment`` (FLAGPROXY_STORE_ENVIRONMENT) for a shared Redis: its keys are
    ``flagproxy:{name}:*`` and no other test's."""
    return f"t{os.getpid()}-{next(_namespaces)}-{re.sub(r'[^A-Za-z0-9_-]+', '-', hint)[:40]}"


# --- webhooks, the admin API and waiting on observables ----------------------------------------------


def sign_body(secret: str, body: bytes, at: int | None = None) -> str:
    """The ``X-Flagproxy-Signature`` value for ``body``: ``t=<at>,v1=<HMAC-SHA256 of "<at>.<body>">``,
    ``at`` defaulting to now (written out here, not taken from the proxy)."""
    stamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), b"%d." % stamp + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def legacy_signature(secret: str, body: bytes) -> str:
    """The old body-only form, ``sha256=<hex HMAC-SHA256 of the body>`` (``[webhooks] legacy_signatures``)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(
    base_url: str,
    payload: Any = None,
    secret: str = "",
    *,
    body: bytes | None = None,
    signature: str | None = None,
    delivery: str | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """POST a native webhook: ``payload`` as JSON (or raw ``body``), signed with ``secret`` now
    unless ``signature`` is given ("" sends none); ``delivery`` sends X-Flagproxy-Delivery."""
    data = body if body is not None else json.dumps(payload).encode()
    sig = sign_body(secret, data) if signature is None else signature
    headers = {"Content-Type": "application/json"}
    if sig:
        headers["X-Flagproxy-Signature"] = sig
    if delivery is not None:
        headers["X-Flagproxy-Delivery"] = delivery
    return http_client().post(
        f"{base_url}/__flags/webhooks/native", content=data, headers=headers, timeout=timeout
    )


def wait_for(
    probe: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Bounded polling of an observable: ``probe()``'s first truthy value, or AssertionError at the
    deadline (with the last value seen)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)  # polling interval, bounded by the deadline


_probe_ids = itertools.count(1)
_http = threading.local()
_http_clients: list[httpx.Client] = []  # kept until close_http_clients(): a worker thread's client
_http_lock = threading.Lock()  # must not reach the garbage collector with its sockets open


def http_client() -> httpx.Client:
    """A keep-alive client of this thread's own (``httpx.get`` builds a new client, TLS context
    included, per call: too slow to poll with)."""
    client = getattr(_http, "client", None)
    if client is None:
        client = _http.client = httpx.Client(timeout=10)
        with _http_lock:
            _http_clients.append(client)
    return client


def close_http_clients() -> None:
    """Close every thread's client (the end of the session)."""
    with _http_lock:
        clients, _http_clients[:] = list(_http_clients), []
    for client in clients:
        client.close()


def served_flags(
    proxy: ProxyProcess,
    origin: RawOrigin,
    user: str = "probe-user",
    path: str = "/probe",
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What the origin received in X-Feature-Flags for one request through ``proxy`` as ``user``."""
    target = f"{path}/{next(_probe_ids)}"
    response = http_client().get(f"{proxy.base_url}{target}", headers={"X-User-Id": user, **(headers or {})})
    assert response.status_code == 200, (response.status_code, response.text)
    header = origin.only_request_to(target).value("X-Feature-Flags")
    return json.loads(header) if header else {}


# --- the proxy in this process -------------------------------------------------------------------------


class InProcessProxy:
    """A ``FlagProxy`` app served by uvicorn in a thread of the test process (to plug in test
    observers or sources); ``with`` starts and stops it."""

    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port
        config = uvicorn.Config(
            app, host=LOCALHOST, port=port, lifespan="on", log_level="warning", http=ClientConnection
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def __enter__(self) -> InProcessProxy:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, what="the in-process proxy")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


# --- chat: signed Slack slash commands, Telegram updates, what fake chat servers received -------------


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Slack's ``X-Slack-Signature``: ``v0=<hex HMAC-SHA256(secret, "v0:<timestamp>:<body>")>``."""
    return "v0=" + hmac.new(secret.encode(), f"v0:{timestamp}:".encode() + body, hashlib.sha256).hexdigest()


_trigger_ids = itertools.count(1)


def slack_form(text: str, user: str = "U0ADMIN", channel: str = "C0OPS", **fields: str) -> bytes:
    """A slash command's form body, as Slack sends it."""
    form = {
        "token": "legacy-unused",
        "team_id": "T0TEAM",
        "team_domain": "example",
        "channel_id": channel,
        "channel_name": "ops",
        "user_id": user,
        "user_name": f"name-{user}",
        "command": "/flag",
        "text": text,
        "api_app_id": "A0APP",
        "trigger_id": f"{next(_trigger_ids)}.1234.abcd",  # unique per command, as Slack's
        **fields,
    }
    return urlencode(form).encode()


def post_slack(
    base_url: str,
    body: bytes,
    secret: str,
    *,
    timestamp: int | None = None,
    signature: str | None = None,
) -> httpx.Response:
    """POST a slash command to ``/__flags/chat/slack``, signed with ``secret`` unless ``signature``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": slack_signature(secret, stamp, body) if signature is None else signature,
    }
    return http_client().post(f"{base_url}/__flags/chat/slack", content=body, headers=headers)


_update_ids = itertools.count(int(time.time()))


def telegram_update(
    text: str,
    user: int = 4242,
    chat: int | None = None,
    chat_type: str = "private",
    update_id: int | None = None,
) -> dict[str, Any]:
    """A Bot API ``Update`` carrying one text message (a bot_command entity when it starts with /)."""
    message: dict[str, Any] = {
        "message_id": next(_update_ids) % 100000,
        "from": {"id": user, "is_bot": False, "first_name": "Ann", "username": f"user{user}"},
        "chat": {"id": user if chat is None else chat, "type": chat_type},
        "date": int(time.time()),
        "text": text,
    }
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return {"update_id": next(_update_ids) if update_id is None else update_id, "message": message}


def post_telegram(base_url: str, update: Any, token: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = token
    return http_client().post(
        f"{base_url}/__flags/chat/telegram", content=json.dumps(update), headers=headers
    )


def json_posts(server: RawOrigin, path: str) -> list[Any]:
    """The JSON bodies ``server`` received at ``path``, in order."""
    return [json.loads(r.body or b"null") for r in server.requests_to(path)]


def audited(base_url: str, token: str, key: str) -> list[tuple[str, str]]:
    """``(action, actor)`` of ``key``'s entries in ``/__flags/api/audit``, newest first."""
    response = http_client().get(
        f"{base_url}/__flags/api/audit", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    return [(e["action"], e["actor"]) for e in response.json()["entries"] if e["flag"] == key]


def settled_count(requests: Sequence[Any], what: str, quiet_s: float = 0.5, timeout_s: float = 10.0) -> int:
    """``len(requests)`` once it has not grown for ``quiet_s`` (a fake API's request log: pulls that
    an earlier test's webhooks started may still be on their way)."""
    deadline = time.monotonic() + timeout_s
    count, since = len(requests), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)  # polling a counter for quiet, bounded by the deadline
        now = len(requests)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return count
    raise AssertionError(f"{what} kept being called for {timeout_s} s")


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to CRITICAL (a corpus' deliberate oddities log a lot); restore after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
