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
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    ROOT,
    WRK_REPORT_LUA,
    BenchError,
    Service,
    Services,
    exit_on_sigterm,
    free_port,
    http_get,
    median_of,
    parse_connections,
    positive_float,
    positive_int,
    proxy_cmd,
    run_wrk,
    summarize,
    tool_version,
    wait_ready,
    write_json,
)

PATH = "/api/anything"
USER_HEADER = ("X-User-Id", "42")
FLAG_HEADER = "x-feature-flags"
READY_PATH = "/__flags/healthz"
READY_TIMEOUT_S = 20.0


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


def start_service(services: Services, name: str, args: list[str], port: int) -> Service:
    cmd = proxy_cmd(args[0], "--log-level", "warning", *args[1:])
    return services.start(name, cmd, port, READY_PATH)


def sanity_check(direct: Service, proxied: Service) -> list[str]:
    """One request each way: both must answer 200, and the origin must see the flag header via the proxy."""
    notes = []
    for service in (direct, proxied):
        status, body = http_get(service.url + PATH, dict([USER_HEADER]))
        if status != 200:
            raise BenchError(f"{service.name}: GET {PATH} answered {status}: {body[:500]!r}")
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


def aggregate(target: str, connections: int, samples: list[dict[str, Any]]) -> Run:
    """Median over rounds for rates and percentiles; error counts are summed."""
    return Run(
        target=target,
        connections=connections,
        **summarize(samples),
        mean_us=median_of(samples, "mean_us"),
        max_us=max(float(s["max_us"]) for s in samples),
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
    args: argparse.Namespace, wrk: str, script: str, services: Services
) -> tuple[list[Run], list[str], str]:
    """Start origin and proxy (in ``services``, for the caller to stop), then run wrk."""

    def run(service: Service, connections: int, duration_s: float) -> dict[str, Any]:
        url = service.url + PATH
        return run_wrk(wrk, script, url, connections, duration_s, args.timeout, args.threads, [USER_HEADER])

    origin_port = free_port()
    origin_args = ["demo-origin", "--host", HOST, "--port", str(origin_port)]
    origin = start_service(services, "origin", origin_args, origin_port)
    wait_ready(origin, READY_TIMEOUT_S)

    proxy_port = free_port()
    proxy_args = ["serve", "--origin", origin.url, "--host", HOST, "--port", str(proxy_port)]
    proxied = start_service(services, "proxy", [*proxy_args, "--flags", args.flags], proxy_port)
    wait_ready(proxied, READY_TIMEOUT_S)
    notes = sanity_check(origin, proxied)

    targets = [("direct", origin), ("proxy", proxied)]
    if args.warmup > 0:
        for _, service in targets:
            run(service, max(args.connections), args.warmup)

    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(args.connections) * len(targets)
    done = 0
    for _ in range(args.rounds):
        for connections in args.connections:
            for name, service in targets:  # interleaved, so drift hits both targets alike
                done += 1
                print(f"[{done}/{total}] {name} c={connections} {args.duration:g}s ...", file=sys.stderr)
                result = run(service, connections, args.duration)
                samples.setdefault((name, connections), []).append(result)
                services.check_alive()

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
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_dir:
        tmp = Path(tmp_dir)
        script = str(tmp / "report.lua")
        Path(script).write_text(WRK_REPORT_LUA)
        services = Services(tmp, new_session=False)
        try:
            runs, notes, proxy_log = measure(args, wrk, script, services)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            services.stop_all()

    meta = {
        "wrk": tool_version([wrk, "--version"]),
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
        write_json(args.json, {"meta": meta, "notes": notes, "runs": [asdict(r) for r in runs]})
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
