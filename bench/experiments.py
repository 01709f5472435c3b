#!/usr/bin/env python3
"""What recording experiments costs: flagproxy with 20 flags, with and without 2 of them being
experiments, in one run, at c=32, in front of the same tiny nginx origin, measured with wrk.

    python bench/experiments.py                 # 3 rounds x 5 s (the numbers for BENCHMARKS.md)
    python bench/experiments.py --quick         # 1 round x 2 s, to try the harness
    python bench/experiments.py --json bench/results/experiments.json

Systems (alternating inside each round, the starting one rotating):

- ``20 flags``: the 20-flag mix of bench/compare.py, no experiment;
- ``20 flags, 2 experiments, SQLite``: the same flags, two of them with an ``experiment`` object
  (exposures recorded in SQLite, the embedded default);
- ``20 flags, 2 experiments, Redis``: the same, recorded in a private redis-server (when one is
  installed; ``--no-redis`` skips it).

Traffic, each system under both:

- ``returning users``: X-User-Id drawn from 10,000 users, as a real audience comes back (most
  exposures are repeats, skipped in process after their first write);
- ``new users``: a new X-User-Id on every request — the worst case: every request writes two new
  exposures.

Afterwards the script reads each experiment proxy's results and metrics: the users it counted must
equal the distinct users sent minus what it reports as dropped — nothing is lost silently.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    WRK_REPORT_LUA,
    BenchError,
    Service,
    Services,
    clean_env,
    cpu_seconds,
    ensure_tools,
    exit_on_sigterm,
    free_port,
    http_get,
    positive_float,
    positive_int,
    run_wrk,
    summarize,
    tool_version,
    wait_port,
    wait_ready,
    write_json,
)
from compare import NGINX_ORIGIN, flag_definition, flagproxy_cmd, start_nginx

PATH = "/api/bench"
CONNECTIONS = 32
USERS = 10_000
TOKEN = "bench-admin-token"
EXPERIMENTS = ("bench-flag-0002", "bench-flag-0007")  # two weighted-variant flags of the mix

RETURNING = (
    r"""
math.randomseed(7)
request = function()
  wrk.headers["X-User-Id"] = "u" .. tostring(math.random(1, """
    + str(USERS)
    + r"""))
  return wrk.format(nil, nil)
end
"""
    + WRK_REPORT_LUA
)
# every returning user once (cycling), before the measured runs: the audience has been seen before
EVERYONE = (
    r"""
local counter = 0
request = function()
  counter = counter + 1
  wrk.headers["X-User-Id"] = "u" .. tostring(counter % """
    + str(USERS)
    + r""" + 1)
  return wrk.format(nil, nil)
end
"""
    + WRK_REPORT_LUA
)
NEW = (  # PREFIX: made unique per wrk run by new_users_script()
    r"""
local counter = 0
local prefix = "PREFIX-"
request = function()
  counter = counter + 1
  wrk.headers["X-User-Id"] = prefix .. tostring(counter)
  return wrk.format(nil, nil)
end
"""
    + WRK_REPORT_LUA
)


def new_users_script(tmp: Path, run: int) -> Path:
    path = tmp / f"new-{run}.lua"
    path.write_text(NEW.replace("PREFIX", f"n{run}"))
    return path


def write_flags(path: Path, experiments: bool) -> Path:
    flags = {f"bench-flag-{i:04d}": flag_definition(i) for i in range(20)}
    if experiments:
        for key in EXPERIMENTS:
            flags[key]["experiment"] = {"control": "control", "goals": ["trade"]}
    path.write_text(json.dumps({"flags": flags}, indent=1) + "\n")
    return path


def admin_get(service: Service, path: str) -> Any:
    request = urllib.request.Request(service.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if path != "/__flags/metrics" else body.decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def start_redis(services: Services, tmp: Path) -> tuple[Service, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    service = services.start("redis", cmd, port, "/")
    wait_port(port)
    return service, f"redis://{HOST}:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--duration", type=positive_float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1 round x 2 s")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis-backed system")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk or nginx")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
    exit_on_sigterm()
    tools = ensure_tools({"nginx": "nginx-light", "wrk": "wrk"}, install=not args.no_install)
    tmp = Path(tempfile.mkdtemp(prefix="flagproxy-bench-exp-"))
    services = Services(tmp)
    try:
        return run(args, tools, tmp, services)
    finally:
        services.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tools: dict[str, str], tmp: Path, services: Services) -> int:
    port = free_port()
    origin = start_nginx(
        services, tools["nginx"], tmp, "origin", NGINX_ORIGIN.format(host=HOST, port=port, echo="/echo"), port
    )
    wait_ready(origin)
    plain, experimental = write_flags(tmp / "plain.json", False), write_flags(tmp / "exp.json", True)

    configs: list[tuple[str, Path, dict[str, str]]] = [
        ("20 flags", plain, {}),
        (
            "20 flags, 2 experiments, SQLite",
            experimental,
            {"FLAGPROXY_EXPERIMENTS_PATH": str(tmp / "exp.sqlite3")},
        ),
    ]
    if not args.no_redis:
        redis = start_redis(services, tmp)
        if redis is not None:
            configs.append(
                ("20 flags, 2 experiments, Redis", experimental, {"FLAGPROXY_STORE_REDIS_URL": redis[1]})
            )
    systems: list[tuple[str, Service]] = []
    for i, (name, flags, env) in enumerate(configs):
        port = free_port()
        extra = {
            "FLAGPROXY_ADMIN_TOKEN": TOKEN,
            "FLAGPROXY_EXPERIMENTS_PATH": str(tmp / f"unused-{i}.sqlite3"),
            **env,
        }
        service = services.start(
            f"flagproxy-{i}",
            flagproxy_cmd(origin.url, flags, port),
            port,
            "/__flags/readyz",
            env=clean_env(extra),
        )
        wait_ready(service, timeout_s=60)
        status, _ = http_get(service.url + PATH, {"X-User-Id": "warm"})
        if status != 200:
            raise BenchError(f"{name}: GET {PATH} answered {status}")
        systems.append((name, service))

    returning = tmp / "returning.lua"
    returning.write_text(RETURNING)
    runs = iter(range(1, 10**6))
    scripts = {"returning users": lambda: returning, "new users": lambda: new_users_script(tmp, next(runs))}
    new_requests: dict[str, int] = {name: 0 for name, _ in systems}
    everyone = tmp / "everyone.lua"
    everyone.write_text(EVERYONE)
    for name, service in systems:  # each system sees the whole audience once (3 s: > 10,000 requests)
        seen = run_wrk(tools["wrk"], everyone, service.url + PATH, CONNECTIONS, 3.0, 10)
        if seen["requests"] < USERS:
            raise BenchError(f"{name}: only {seen['requests']} requests in the audience warm-up")
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for traffic, script in scripts.items():
        for name, service in systems:
            if args.warmup > 0:
                warm = run_wrk(tools["wrk"], script(), service.url + PATH, CONNECTIONS, args.warmup, 10)
                if traffic == "new users":
                    new_requests[name] += warm["requests"]
        for r in range(args.rounds):
            shift = r % len(systems)
            for name, service in systems[shift:] + systems[:shift]:
                print(f"bench: {traffic} round {r + 1} {name}", file=sys.stderr, flush=True)
                before = cpu_seconds(service.pid)
                result = run_wrk(tools["wrk"], script(), service.url + PATH, CONNECTIONS, args.duration, 10)
                if traffic == "new users":
                    new_requests[name] += result["requests"]
                result["cpu_us"] = (cpu_seconds(service.pid) - before) * 1e6 / max(1, result["requests"])
                samples.setdefault((traffic, name), []).append(result)

    time.sleep(1.0)  # the writers' last batches
    report: dict[str, Any] = {
        "machine": platform.platform(),
        "wrk": tool_version([tools["wrk"], "-v"]),
        "rows": [],
    }
    print("\n| traffic | system | req/s | vs. no experiments | p50 | p99 | CPU µs/req |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for traffic in scripts:
        base = summarize(samples[(traffic, systems[0][0])])["rps"]
        for name, _ in systems:
            row = summarize(samples[(traffic, name)])
            ratio = row["rps"] / base if base else 0.0
            runs = [
                {"rps": round(x["rps"]), "cpu_us": round(x["cpu_us"], 1)} for x in samples[(traffic, name)]
            ]
            report["rows"].append({"traffic": traffic, "system": name, **row, "ratio": ratio, "runs": runs})
            print(
                f"| {traffic} | {name} | {row['rps']:,.0f} | {ratio:.3f}x | {row['p50_us'] / 1000:.2f} ms | "
                f"{row['p99_us'] / 1000:.2f} ms | {row.get('cpu_us', 0):.0f} |"
            )
    print()
    for name, service in systems[1:]:
        metrics = admin_get(service, "/__flags/metrics")
        users = {key: admin_get(service, f"/__flags/api/experiments/{key}")["users"] for key in EXPERIMENTS}
        sent = USERS + new_requests[name] + 1  # the audience, every new-user request, and "warm"
        line = {
            "system": name,
            "distinct_users_sent": sent,
            "users_counted": users,
            "exposures_new": metric(metrics, 'flagproxy_exposures_recorded_total{result="new"}'),
            "exposures_deduplicated": metric(metrics, "flagproxy_exposures_deduplicated_total"),
            "exposures_dropped": metric(metrics, "flagproxy_exposures_dropped_total"),
            "write_errors": metric(metrics, "flagproxy_experiment_write_errors_total"),
        }
        report.setdefault("recorded", []).append(line)
        dropped = line["exposures_dropped"]
        for key, counted in users.items():
            if counted + dropped < sent:
                print(
                    f"bench: WARNING {name} {key}: {sent - counted} users not counted, {dropped:.0f} dropped"
                )
        print(f"{name}: {json.dumps(line)}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
    except subprocess.SubprocessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
