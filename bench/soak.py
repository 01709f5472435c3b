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
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _harness import (
    MIB,
    WRK_REPORT_LUA,
    clean_env,
    free_port,
    proxy_cmd,
    rss_bytes,
    run_wrk,
    start_process,
    stop_process,
    wait_port,
)

LUA = (
    """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/api/soak", {["X-User-Id"] = "user-" .. counter})
end
"""
    + WRK_REPORT_LUA
)


def flags_file(tmp: Path) -> Path:
    flags: dict[str, Any] = {}
    for i in range(10):
        flags[f"b{i}"] = {"percentage": 10 * i, "priority": i}
        flags[f"v{i}"] = {"variants": {"a": {"weight": 1, "config": {"size": "x" * 60}}, "b": {"weight": 1}}}
    path = tmp / "flags.json"
    path.write_text(json.dumps({"flags": flags}))
    return path


def wrk(port: int, seconds: int, connections: int, script: Path) -> dict[str, float]:
    wrk_path = shutil.which("wrk") or "wrk"
    r = run_wrk(wrk_path, script, f"http://127.0.0.1:{port}/api/soak", connections, seconds, timeout_s=2)
    e = r["errors"]
    return {
        "rps": r["rps"],
        "p99_ms": r["p99_us"] / 1000,
        "errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "non2xx": e["status"],
    }


class Stack:
    """demo origin + one flagproxy, on free ports; stopped on exit."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env, self.procs = tmp, env, []

    def __enter__(self) -> Stack:
        self.origin_port, self.port = free_port(), free_port()
        origin = proxy_cmd("demo-origin", "--port", str(self.origin_port), "--log-level", "warning")
        self.procs.append(start_process(origin))
        origin_url = f"http://127.0.0.1:{self.origin_port}"
        flags = str(flags_file(self.tmp))
        cmd = proxy_cmd("serve", "--port", str(self.port), "--origin", origin_url, "--flags", flags)
        self.proxy = start_process([*cmd, "--log-level", "error"], env=clean_env(self.env))
        self.procs.append(self.proxy)
        wait_port(self.origin_port)
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout_s=10)


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
            samples.append(rss_bytes(stack.proxy.pid) / MIB)
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
