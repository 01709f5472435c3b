"""Helpers shared by the bench scripts: ports, processes, readiness, RSS, wrk, tools, arguments.

Not a benchmark itself. The scripts run as ``python bench/X.py``, so bench/ is on ``sys.path`` and they
import this module as ``from _harness import ...``. Nothing here imports the ``proxy`` package: the
servers under test always run in child processes (``proxy_cmd``), so each child imports the checkout its
working directory (or PYTHONPATH) points at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MIB = 1 << 20
READY_TIMEOUT_S = 30.0


class BenchError(Exception):
    pass


class ToolMissing(BenchError):
    pass


# --- ports and HTTP -------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20.0, host: str = HOST) -> None:
    """Until something accepts TCP connections on ``host:port``; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout_s}s")


def http_request(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: (status, response headers with lower-case names, body); an HTTP error status is
    returned, not raised. Connection errors raise."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); an HTTP error status is returned, not raised. Connection errors raise."""
    status, _, body = http_request(url, headers, timeout)
    return status, body


# --- processes ------------------------------------------------------------------------------------


def proxy_cmd(*args: str) -> list[str]:
    """``python -m proxy ARGS`` with this interpreter; which ``proxy`` it imports depends on the child's
    working directory and PYTHONPATH (see ``start_process``)."""
    return [sys.executable, "-m", "proxy", *args]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``FLAGPROXY_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGPROXY_")}
    return env | dict(extra or {})


def start_process(
    cmd: list[str],
    *,
    log: Path | None = None,
    cwd: Path | None = ROOT,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``cmd``. With ``log``: stdin from /dev/null, stdout and stderr into that file; without, the
    child shares our stdin/stdout/stderr. ``cwd=None`` keeps ours. ``new_session``: the child leads its
    own process group (Ctrl-C reaches only us; ``stop_process(group=True)`` ends the group)."""
    if log is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=new_session)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0, *, group: bool = False) -> None:
    """SIGTERM, up to ``timeout_s`` to exit, then SIGKILL. ``group``: signal the child's whole process
    group (started with ``new_session=True``) and SIGKILL what is left of it afterwards (workers)."""
    if proc.poll() is None:
        if group:
            signal_group(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if group:
                signal_group(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(timeout=5)
    if group:
        signal_group(proc.pid, signal.SIGKILL)  # stragglers in its group, if any


def exit_on_sigterm() -> None:
    """Make a plain ``kill`` raise SystemExit, so ``finally`` blocks still stop the servers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@dataclass
class Service:
    """A started server: where it answers and where its output goes."""

    name: str
    url: str
    ready_path: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra_logs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, limit: int = 2000) -> str:
        parts = []
        for path in (self.log, *self.extra_logs):
            try:
                text = path.read_bytes().decode("utf-8", "replace").strip()
            except OSError:
                continue
            if text:
                parts.append(text[-limit:])
        return "\n".join(parts)


class Services:
    """Every server a run started, logging into ``tmp``; ``stop_all`` ends them, last started first.

    ``new_session``: each runs in its own process group, and stopping one ends its whole group."""

    def __init__(self, tmp: Path, new_session: bool = True) -> None:
        self.tmp = tmp
        self.new_session = new_session
        self.items: list[Service] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        port: int,
        ready_path: str,
        extra_logs: list[Path] | None = None,
        *,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> Service:
        log = self.tmp / f"{name}.log"
        proc = start_process(cmd, log=log, cwd=cwd, env=env, new_session=self.new_session)
        service = Service(name, f"http://{HOST}:{port}", ready_path, proc, log, extra_logs or [])
        self.items.append(service)
        return service

    def stop(self, service: Service) -> None:
        stop_process(service.proc, group=self.new_session)
        if service in self.items:
            self.items.remove(service)

    def stop_all(self) -> None:
        for service in reversed(list(self.items)):
            try:
                self.stop(service)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {service.name} (pid {service.pid}): {exc}", file=sys.stderr)

    def stop_all_but(self, keep: Service | None) -> None:
        for service in reversed(list(self.items)):
            if service is not keep:
                self.stop(service)

    def check_alive(self) -> None:
        for service in self.items:
            if service.proc.poll() is not None:
                raise BenchError(
                    f"{service.name} exited with code {service.proc.returncode}:\n{service.log_tail()}"
                )


def wait_ready(service: Service, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll until ``ready_path`` answers 200; returns the seconds it took since the process started."""
    start = time.monotonic()
    deadline = start + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise BenchError(
                f"{service.name} exited with code {service.proc.returncode} before it was ready:\n"
                f"{service.log_tail()}"
            )
        try:
            status, _ = http_get(service.url + service.ready_path, timeout=1)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"{service.name} not ready after {timeout_s:.0f}s ({last}):\n{service.log_tail()}")


# --- /proc ----------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid`` in bytes; 0 when it is gone or a zombie (no VmRSS line)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # utime/stime unit


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state is [0], ppid [1], utime [11],
    stime [12]); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), ``pid`` first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid`` and its live descendants (all their threads), in
    seconds, from ``/proc/<pid>/stat`` (clock ticks of ``SC_CLK_TCK``). Take it before and after a run:
    the difference is what the server's process tree spent on it."""
    ticks = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


# --- wrk ------------------------------------------------------------------------------------------

WRK_MARKER = "BENCH_RESULT "

# Append to a wrk Lua script: wrk calls done() once, after the run, and it prints one line that
# ``run_wrk`` parses. Latency values are in microseconds, summary.duration too.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(
    wrk: str,
    script: str | Path,
    url: str,
    connections: int,
    duration_s: float,
    timeout_s: float,
    threads: int = 1,
    headers: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """One wrk run against ``url`` (path included) with ``script``, which must end with
    ``WRK_REPORT_LUA``. Returns its result line as a dict, plus ``rps``; error counters are under
    ``errors`` (``status`` = non-2xx/3xx responses). BenchError when wrk fails or overruns."""
    threads = max(1, min(threads, connections))  # wrk refuses fewer connections than threads
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
    ]
    for name, value in headers:
        cmd += ["-H", f"{name}: {value}"]
    cmd += ["-s", str(script), url]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in time: {' '.join(cmd)}") from None
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    for line in out.stdout.splitlines():
        if line.startswith(WRK_MARKER):
            data = json.loads(line[len(WRK_MARKER) :])
            seconds = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / seconds if seconds > 0 else 0.0
            return data
    raise BenchError(f"no result line in wrk output:\n{out.stdout}\n{out.stderr}")


def median_of(samples: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def summed_errors(samples: list[dict[str, Any]]) -> dict[str, int]:
    """wrk error counters added up over runs."""
    errors: dict[str, int] = {}
    for s in samples:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + int(v)
    return errors


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``run_wrk`` results of the same run repeated: medians of req/s and the latency percentiles,
    requests and error counters summed, and the number of rounds. With ``cpu_us`` in every sample (CPU
    µs per request, added by the caller) its median as well."""
    out = {
        "rps": median_of(samples, "rps"),
        "p50_us": median_of(samples, "p50_us"),
        "p90_us": median_of(samples, "p90_us"),
        "p99_us": median_of(samples, "p99_us"),
        "requests": sum(int(s["requests"]) for s in samples),
        "errors": summed_errors(samples),
        "rounds": len(samples),
    }
    if samples and all(s.get("cpu_us") is not None for s in samples):
        out["cpu_us"] = median_of(samples, "cpu_us")
    return out


# --- tools ----------------------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):  # not on PATH for non-root users
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    print(f"bench: installing {' '.join(packages)} with apt-get ...", file=sys.stderr)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:  # stale or missing package lists: update once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise ToolMissing(f"apt-get install {' '.join(packages)} failed:\n{out.stderr.strip()[-2000:]}")


def ensure_tools(wanted: dict[str, str], install: bool) -> dict[str, str]:
    """Paths of the ``wanted`` binaries (name -> Debian package). Missing ones are installed with apt-get
    when ``install`` and we are root on a system with apt-get; ToolMissing otherwise."""
    missing = [name for name in wanted if find_binary(name) is None]
    if missing and install:
        can_apt = os.geteuid() == 0 and shutil.which("apt-get") is not None
        if can_apt:
            apt_install([wanted[name] for name in missing])
        else:
            raise ToolMissing(
                f"missing: {', '.join(missing)}. Install them first, e.g.\n"
                f"  sudo apt-get install -y {' '.join(wanted[n] for n in missing)}   (Debian/Ubuntu)\n"
                f"  brew install {' '.join(wanted)}                        (macOS)\n"
                "(this script installs them itself only when run as root on a system with apt-get)"
            )
    tools = {name: find_binary(name) for name in wanted}
    still = [name for name, path in tools.items() if path is None]
    if still:
        raise ToolMissing(f"missing: {', '.join(still)} (install {', '.join(wanted[n] for n in still)})")
    return {k: v for k, v in tools.items() if v}


def tool_version(cmd: list[str]) -> str:
    """First line of ``cmd``'s output (e.g. ``[wrk, "--version"]``) without the copyright; "?" on failure."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].split(" Copyright")[0].strip() if text else "?"


# --- arguments and output -------------------------------------------------------------------------


def parse_counts(text: str, what: str = "counts") -> list[int]:
    """Comma-separated integers >= 1 (duplicates dropped, order kept)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be >= 1")
    return list(dict.fromkeys(values))


def parse_connections(text: str) -> list[int]:
    return parse_counts(text, "connection counts")


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON into ``path`` (parent directories created); says so on stderr."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
