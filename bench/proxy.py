#!/usr/bin/env python3
"""Throughput and latency through flagproxy vs the origin directly, on loopback, measured with wrk.

Starts ``flagproxy demo-origin`` and ``flagproxy serve`` in front of it on free 127.0.0.1 ports,
waits for both to answer ``GET /__flags/healthz``, then runs wrk against each target at each
connection count (``GET /api/anything`` with ``X-User-Id: 42``) and prints a markdown table.
Every process it starts is stopped on the way out. See bench/README.md.

    python bench/proxy.py [--duration 5] [--connections 1,32] [--threads 1] [--rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PATH = "/api/anything"
USER_HEADER = ("X-User-Id", "42")
FLAG_HEADER = "x-feature-flags"
READY_PATH = "/__flags/healthz"
READY_TIMEOUT_S = 20.0
MARKER = "BENCH_RESULT "

# wrk calls done() once, after the run; latency values are in microseconds, summary.duration too.
WRK_SCRIPT = r"""
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


class BenchError(Exception):
    pass


@dataclass
class Run:
    target: str
    connections: int
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    rounds: int = 1


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_bytes().decode("utf-8", "replace")[-limit:]
        except OSError:
            return ""


def start_service(name: str, args: list[str], port: int, tmp: Path) -> Service:
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "proxy", args[0], "--log-level", "warning", *args[1:]]
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Service(name, f"http://{HOST}:{port}", proc, log)


def stop_service(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.terminate()
        try:
            service.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait(timeout=5)


def wait_ready(service: Service, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise BenchError(
                f"{service.name} exited with code {service.proc.returncode} before it was ready:\n"
                f"{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(service.url + READY_PATH, timeout=1) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{service.name} not ready after {timeout_s:.0f}s ({last}):\n{service.log_tail()}")


def sanity_check(direct: Service, proxied: Service) -> list[str]:
    """One request each way: both must answer 200, and the origin must see the flag header via the proxy."""
    notes = []
    for service in (direct, proxied):
        req = urllib.request.Request(service.url + PATH, headers=dict([USER_HEADER]))
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500]
            raise BenchError(f"{service.name}: GET {PATH} answered {exc.code}: {detail!r}") from None
        if status != 200:
            raise BenchError(f"{service.name}: GET {PATH} answered {status}")
        if service is proxied:
            try:
                seen = json.loads(body)["headers"]
            except (ValueError, KeyError, TypeError):
                raise BenchError(f"{service.name}: origin echo not JSON: {body[:200]!r}") from None
            if FLAG_HEADER not in seen:
                notes.append(f"the origin did not receive {FLAG_HEADER} through the proxy")
            else:
                notes.append(f"{FLAG_HEADER} forwarded to the origin: {len(seen[FLAG_HEADER])} bytes")
    return notes


# --- wrk ------------------------------------------------------------------------------------------


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].split(" Copyright")[0].strip() if text else "?"


def run_wrk(
    wrk: str, script: str, url: str, connections: int, threads: int, duration_s: float, timeout_s: float
) -> dict[str, Any]:
    threads = max(1, min(threads, connections))  # wrk refuses fewer connections than threads
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-H",
        f"{USER_HEADER[0]}: {USER_HEADER[1]}",
        "-s",
        script,
        url + PATH,
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in time: {' '.join(cmd)}") from None
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    for line in out.stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            seconds = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / seconds if seconds > 0 else 0.0
            return data
    raise BenchError(f"no result line in wrk output:\n{out.stdout}\n{out.stderr}")


def aggregate(target: str, connections: int, samples: list[dict[str, Any]]) -> Run:
    """Median over rounds for rates and percentiles; error counts are summed."""

    def med(key: str) -> float:
        return float(statistics.median(s[key] for s in samples))

    errors: dict[str, int] = {}
    for s in samples:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + int(v)
    return Run(
        target=target,
        connections=connections,
        rps=med("rps"),
        p50_us=med("p50_us"),
        p90_us=med("p90_us"),
        p99_us=med("p99_us"),
        mean_us=med("mean_us"),
        max_us=max(float(s["max_us"]) for s in samples),
        requests=sum(int(s["requests"]) for s in samples),
        errors=errors,
        rounds=len(samples),
    )


# --- output ---------------------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    return f"{us:,.0f}"


def markdown_table(runs: list[Run]) -> str:
    direct = {r.connections: r for r in runs if r.target == "direct"}
    lines = [
        "| target | connections | req/s | p50 µs | p90 µs | p99 µs | errors "
        "| proxy/direct req/s | added p50 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        errors = sum(r.errors.values())
        base = direct.get(r.connections)
        if r.target == "proxy" and base is not None and base.rps > 0:
            ratio = f"{r.rps / base.rps:.2f}"
            added = f"{r.p50_us - base.p50_us:+,.0f}"
        else:
            ratio = added = ""
        lines.append(
            f"| {r.target} | {r.connections} | {r.rps:,.0f} | {fmt_us(r.p50_us)} | {fmt_us(r.p90_us)} "
            f"| {fmt_us(r.p99_us)} | {errors} | {ratio} | {added} |"
        )
    return "\n".join(lines)


def parse_connections(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return values


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark flagproxy against its origin on loopback with wrk.")
    p.add_argument("--duration", type=positive_float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument(
        "--connections", type=parse_connections, default=[1, 32], help="comma-separated (default 1,32)"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="wrk threads (default 1)")
    p.add_argument("--rounds", type=positive_int, default=1, help="repeat each run; medians (default 1)")
    p.add_argument("--warmup", type=float, default=1.0, help="discarded warm-up seconds per target (0: none)")
    p.add_argument("--timeout", type=positive_float, default=2.0, help="wrk per-request timeout (default 2s)")
    p.add_argument("--flags", default=str(ROOT / "seeds" / "flags.json"), help="flags file for the proxy")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return p


def measure(
    args: argparse.Namespace, wrk: str, script: str, tmp: Path, services: list[Service]
) -> tuple[list[Run], list[str], str]:
    """Start origin and proxy (appended to ``services`` for the caller to stop), then run wrk."""
    origin_port = free_port()
    origin_args = ["demo-origin", "--host", HOST, "--port", str(origin_port)]
    origin = start_service("origin", origin_args, origin_port, tmp)
    services.append(origin)
    wait_ready(origin)

    proxy_port = free_port()
    proxy_args = ["serve", "--origin", origin.url, "--host", HOST, "--port", str(proxy_port)]
    proxied = start_service("proxy", [*proxy_args, "--flags", args.flags], proxy_port, tmp)
    services.append(proxied)
    wait_ready(proxied)
    notes = sanity_check(origin, proxied)

    targets = [("direct", origin), ("proxy", proxied)]
    if args.warmup > 0:
        for _, service in targets:
            c = max(args.connections)
            run_wrk(wrk, script, service.url, c, args.threads, args.warmup, args.timeout)

    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(args.connections) * len(targets)
    done = 0
    for _ in range(args.rounds):
        for connections in args.connections:
            for name, service in targets:  # interleaved, so drift hits both targets alike
                done += 1
                print(f"[{done}/{total}] {name} c={connections} {args.duration:g}s ...", file=sys.stderr)
                result = run_wrk(
                    wrk, script, service.url, connections, args.threads, args.duration, args.timeout
                )
                samples.setdefault((name, connections), []).append(result)
                for service_ in services:
                    if service_.proc.poll() is not None:
                        raise BenchError(f"{service_.name} died during the run:\n{service_.log_tail()}")

    runs = [
        aggregate(name, connections, samples[(name, connections)])
        for connections in args.connections
        for name, _ in targets
    ]
    return runs, notes, proxied.log_tail(4000).strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "bench: wrk is not on PATH. Install it first:\n"
            "  Debian/Ubuntu: sudo apt-get install wrk\n"
            "  macOS:         brew install wrk\n"
            "  other:         build from https://github.com/wg/wrk",
            file=sys.stderr,
        )
        return 2

    # A plain `kill` of the benchmark must still run the finally below and stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_dir:
        tmp = Path(tmp_dir)
        script = str(tmp / "report.lua")
        Path(script).write_text(WRK_SCRIPT)
        try:
            runs, notes, proxy_log = measure(args, wrk, script, tmp, services)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            for service in reversed(services):
                stop_service(service)

    meta = {
        "wrk": wrk_version(wrk),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "path": PATH,
        "header": f"{USER_HEADER[0]}: {USER_HEADER[1]}",
        "duration_s": args.duration,
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
    }
    print(
        f"\nflagproxy vs direct, GET {PATH} with {meta['header']}, wrk -t{args.threads} "
        f"-d{args.duration:g}s, {args.rounds} round(s), {meta['cpus']} CPUs, {meta['wrk']}\n"
    )
    print(markdown_table(runs))
    print()
    for note in notes:
        print(f"- {note}")
    bad = [r for r in runs if sum(r.errors.values())]
    for r in bad:
        print(f"- {r.target} c={r.connections}: errors {r.errors} (status = non-2xx/3xx responses)")
    if proxy_log:
        print(f"- proxy log (warnings and above):\n{proxy_log}")

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"meta": meta, "notes": notes, "runs": [asdict(r) for r in runs]}
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
