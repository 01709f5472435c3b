"""Long reliability runs (not part of `make test`): a soak with RSS sampling, and Slack faults vs latency.

    python bench/soak.py soak [--seconds 300] [--connections 32]
    python bench/soak.py slack [--seconds 10]

soak:  flagproxy (20 flags, budget on) in front of the demo origin under wrk at c=32; the proxy's RSS is
       sampled every 5 s after a 30 s warm-up. Passes when every sample is within ±5 % of the first and
       wrk saw no errors.
slack: the same proxy with a header budget small enough that every request trims flags (so every
       request raises an alert), against a Slack stand-in answering 200, 429, 500, or never; reports
       wrk's p99 for each next to a run without alerts. Passes when each p99 is within 10 % of the
       baseline (plus 1 ms of slack for timer noise at sub-millisecond latencies).
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LUA = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/api/soak", {["X-User-Id"] = "user-" .. counter})
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing on 127.0.0.1:{port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flags_file(tmp: Path) -> Path:
    flags: dict[str, Any] = {}
    for i in range(10):
        flags[f"b{i}"] = {"percentage": 10 * i, "priority": i}
        flags[f"v{i}"] = {"variants": {"a": {"weight": 1, "config": {"size": "x" * 60}}, "b": {"weight": 1}}}
    path = tmp / "flags.json"
    path.write_text(json.dumps({"flags": flags}))
    return path


def wrk(port: int, seconds: int, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/api/soak",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
        "errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


class Stack:
    """demo origin + one flagproxy, on free ports; stopped on exit."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env, self.procs = tmp, env, []

    def __enter__(self) -> Stack:
        py = sys.executable
        self.origin_port, self.port = free_port(), free_port()
        self.procs.append(
            subprocess.Popen(
                [py, "-m", "proxy", "demo-origin", "--port", str(self.origin_port), "--log-level", "warning"],
                cwd=REPO,
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGPROXY_")} | self.env
        self.proxy = subprocess.Popen(
            [
                py,
                "-m",
                "proxy",
                "serve",
                "--port",
                str(self.port),
                "--origin",
                f"http://127.0.0.1:{self.origin_port}",
                "--flags",
                str(flags_file(self.tmp)),
                "--log-level",
                "error",
            ],
            cwd=REPO,
            env=env,
        )
        self.procs.append(self.proxy)
        wait_port(self.origin_port)
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def soak(args: argparse.Namespace, tmp: Path, script: Path) -> bool:
    with Stack(tmp, {}) as stack:
        result: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: result.update(wrk(stack.port, args.seconds, args.connections, script))
        )
        runner.start()
        time.sleep(min(30, args.seconds / 3))  # warm-up
        samples = []
        while runner.is_alive():
            samples.append(rss_mb(stack.proxy.pid))
            runner.join(5)
    base = samples[0]
    spread = max(abs(s - base) / base for s in samples)
    rate = f"{result['rps']:.0f} req/s, errors {result['errors']}, non-2xx {result['non2xx']}"
    print(f"soak: {args.seconds}s at c={args.connections}: {rate}")
    print(
        f"RSS after warm-up {base:.1f} MB; samples {min(samples):.1f}-{max(samples):.1f} MB; "
        f"largest deviation {100 * spread:.1f} % (limit ±5 %)"
    )
    return spread <= 0.05 and result["errors"] == 0 and result["non2xx"] == 0


class Slack(BaseHTTPRequestHandler):
    mode = "ok"
    received = 0

    def log_message(self, *a: Any) -> None:
        return

    def do_POST(self) -> None:
        type(self).received += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "hang":
            time.sleep(30)
            return
        status = {"ok": 200, "429": 429, "500": 500}[self.mode]
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def slack(args: argparse.Namespace, tmp: Path, script: Path) -> bool:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slack)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/services/T/B/X"
    tight = {
        "FLAGPROXY_HEADER_LIMIT_BYTES": "700",
        "FLAGPROXY_HEADER_RESERVE_BYTES": "0",
        "FLAGPROXY_ALERTS_COOLDOWN_S": "0",
    }  # every request trims and alerts
    results = {}
    with Stack(tmp, tight) as stack:  # baseline: alerts only logged, no Slack
        wrk(stack.port, 2, 32, script)
        results["no slack"] = wrk(stack.port, args.seconds, 32, script)
    for mode in ("ok", "429", "500", "hang"):
        Slack.mode = mode
        with Stack(tmp, tight | {"FLAGPROXY_ALERTS_SLACK_WEBHOOK_URL": url}) as stack:
            wrk(stack.port, 2, 32, script)
            results[f"slack {mode}"] = wrk(stack.port, args.seconds, 32, script)
    server.shutdown()
    base = results["no slack"]["p99_ms"]
    ok = True
    print("| Slack | req/s | p99 ms | vs baseline |\n|---|---:|---:|---:|")
    for name, r in results.items():
        within = r["p99_ms"] <= base * 1.10 + 1.0
        ok &= within and r["errors"] == 0
        mark = "" if within else " ✗"
        print(f"| {name} | {r['rps']:.0f} | {r['p99_ms']:.2f} | {r['p99_ms'] / base:.2f}x{mark} |")
    print(f"Slack stand-in received {Slack.received} posts")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["soak", "slack"])
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    args.seconds = args.seconds or (300 if args.mode == "soak" else 10)
    if shutil.which("wrk") is None:
        print("wrk is required (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="flagproxy-soak-"))
    script = tmp / "ids.lua"
    script.write_text(LUA)
    try:
        ok = soak(args, tmp, script) if args.mode == "soak" else slack(args, tmp, script)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
