"""`flagproxy serve --workers N`: several processes, each with its own snapshot and subscription."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import post_webhook, wait_for

SECRET = "workers-secret-0123456789"


def test_two_workers_both_serve_a_webhook_change(
    redis_server, redis_namespace, proxy_factory, origin
) -> None:
    env = {"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace, "FLAGPROXY_WEBHOOKS_SECRET": SECRET}
    proxy = proxy_factory(
        [origin.url],
        flags={"flags": {"w": {"enabled": False}}},
        env=env,
        args=["--workers", "2", "--redis-url", redis_server.url],
    )
    assert post_webhook(proxy.base_url, {"upsert": {"w": {"enabled": True}}}, SECRET).status_code == 202

    def served(i: int) -> bool:
        # A new connection per request, so the kernel spreads them over both workers.
        with httpx.Client() as client:
            client.get(f"{proxy.base_url}/workers/{i}", headers={"X-User-Id": "u"})
        return origin.only_request_to(f"/workers/{i}").value("X-Feature-Flags") == '{"w":true}'

    wait_for(lambda: served(0), what="the change served")
    assert all(served(i) for i in range(1, 41))
    assert len(worker_pids(proxy.pid)) == 2


def worker_pids(parent: int) -> list[int]:
    """Child processes started by multiprocessing (uvicorn's workers) of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found
