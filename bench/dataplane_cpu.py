#!/usr/bin/env python3
"""CPU cost of the data plane's own work per request, without sockets: a client connection and a
pooled upstream connection driven with in-memory transports, one request and response at a time.

    python bench/dataplane_cpu.py                    # 20 flags, 20,000 requests
    python bench/dataplane_cpu.py --flags 5000 --requests 5000
    python bench/dataplane_cpu.py --profile          # where the time goes (cProfile, top 25)
    python bench/dataplane_cpu.py --experiments 2 [--users 10000]   # two of them experiments

Everything a proxied request costs in Python is in it (parsing both sides, context, flag
evaluation and fitting, both head rewrites, timers, observers); the system calls, the event loop's
polling and the kernel are not. Each request has a fresh X-User-Id, like bench/compare.py (or one
of ``--users`` returning users). With ``--experiments N``, N of the flags are experiments: the
exposures are recorded in SQLite, and the CPU of the writer thread, until everything is written, is
counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the checkout: bench/proxy.py must not shadow the package

import uvloop  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from proxy.app import FlagProxy, freeze_heap  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from proxy.dataplane.client_side import ClientConnection  # noqa: E402
from proxy.dataplane.upstream_side import UpstreamConnection  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class Config:
    def __init__(self, app: Any) -> None:
        self.loaded_app = app


def flags_file(count: int, directory: Path, experiments: int = 0) -> Path:
    from compare import flag_definition

    path = directory / f"flags-{count}.json"
    flags = {f"bench-flag-{i:04d}": flag_definition(i) for i in range(count)}
    variant_flags = [key for key, flag in flags.items() if "variants" in flag and "routes" not in flag]
    for key in variant_flags[:experiments]:
        flags[key]["experiment"] = {"goals": ["trade"]}
    path.write_text(json.dumps({"flags": flags}))
    return path


async def drive(app: FlagProxy, requests: int, users: int = 0) -> float:
    await app.forwarder.start()
    if app.recorder is not None:
        app.recorder.start()
    client = ClientConnection(Config(app), ServerState())
    client.connection_made(MemoryTransport())
    pool = app.forwarder.pool(app.forwarder.router.origins[0])
    upstream = UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport())
    pool.open = 1
    pool.release(upstream, True)
    heads = [
        b"GET /api/anything HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-User-Id: %d\r\n\r\n"
        % (i % users if users else i)
        for i in range(requests)
    ]
    if users and app.recorder is not None:  # returning users: each seen (and written) once before
        for head in heads[:users]:
            client.data_received(head)
            upstream.data_received(RESPONSE)
        await app.recorder.flushed(60)
    started = time.process_time()  # every thread of the process: the experiment writer's too
    for i, head in enumerate(heads):
        client.data_received(head)
        upstream.data_received(RESPONSE)
        if i % 500 == 499:
            await asyncio.sleep(0)  # as between a real loop's iterations: the writer may run
    if app.recorder is not None:
        await app.recorder.flushed(60)
    elapsed = time.process_time() - started
    if client.requests != requests + (users if users and app.recorder is not None else 0):
        raise SystemExit(f"only {client.requests} of {requests} requests completed")
    app.observers.close()
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flags", type=int, default=20)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--experiments", type=int, default=0, help="how many of the flags are experiments")
    p.add_argument("--users", type=int, default=0, help="returning users (0: a new one per request)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = flags_file(args.flags, Path(tmp), args.experiments)
        settings = load_settings(
            overrides={
                "store": {"flags_file": str(path)},
                "experiments": {"path": str(Path(tmp) / "experiments.sqlite3")},
            },
            origins=["http://127.0.0.1:9"],
            env={},
        )
        app = FlagProxy(settings)
        app.observers.start()
        freeze_heap()  # as startup does
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
        elapsed = uvloop.run(drive(app, args.requests, args.users))  # the loop flagproxy serve runs on
        if app.recorder is not None:
            app.recorder.close()
        if args.profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    print(
        f"{args.flags} flags, {args.experiments} experiments, "
        f"{f'{args.users} returning users' if args.users else 'new users'}: "
        f"{elapsed / args.requests * 1e6:.1f} µs CPU per request ({args.requests} requests)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
