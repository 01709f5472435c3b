"""Redis as real deployments run it: Sentinel, Cluster, TLS with an ACL user, and what the log says
while Redis is away. Every deployment is real (Debian's redis-server 7, started here on free loopback
ports, ``tests/redis_topologies.py``) and so are the ``flagproxy serve`` processes in front of it.

Failover tests keep traffic flowing through two proxies while the master dies: no request may get a
5xx, and a change made after the failover must reach both instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_topologies import (
    MasterServer,
    RedisClusterDeployment,
    ReplicaServer,
    SentinelDeployment,
    TlsRedisServer,
)
from support import (
    LOCALHOST,
    ProxyProcess,
    RawOrigin,
    RedisServer,
    free_port,
    http_client,
    post_webhook,
    served_flags,
    unique_namespace,
    wait_for,
)

from proxy.config import ConfigError, StoreSettings, load_settings
from proxy.experiments.records import ExposureRecord
from proxy.experiments.redis_backend import RedisBackend
from proxy.sources.registry import DEFAULT
from proxy.store import connect
from proxy.store.base import StoreUnavailable
from proxy.store.change import Change
from proxy.store.redis import RedisStore
from proxy.store.redis_ledger import RedisLedger
from proxy.store.state import RawState

SECRET = "webhook-secret"
SEED = {"flags": {"banner": {"enabled": False}}}


def env_for(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        "FLAGPROXY_STORE_RECONNECT_MAX_S": "0.2",
        **extra,
    }


def start_proxies(
    origin: RawOrigin, tmp: Path, env: dict[str, str], args: tuple[str, ...] = (), count: int = 2, **kw: Any
) -> list[ProxyProcess]:
    proxies = []
    for i in range(count):
        (tmp / f"p{i}").mkdir(parents=True, exist_ok=True)
        proxies.append(
            ProxyProcess(
                [origin.url], flags=SEED, env=env, args=list(args), tmp_dir=tmp / f"p{i}", **kw
            ).start()
        )
    return proxies


def change(proxy: ProxyProcess, flags: dict[str, Any], timeout: float = 20.0) -> None:
    """A webhook write, retried while the store answers 503 (a failover in progress)."""

    def accepted() -> bool:
        with contextlib.suppress(httpx.TransportError):
            response = post_webhook(proxy.base_url, {"upsert": flags}, SECRET)
            assert response.status_code in (202, 503), response.text
            return response.status_code == 202
        return False

    wait_for(accepted, timeout=timeout, interval=0.1, what="the change accepted")


def wait_served(proxies: list[ProxyProcess], origin: RawOrigin, expected: dict[str, Any]) -> None:
    for proxy in proxies:
        wait_for(
            lambda p=proxy: served_flags(p, origin) == expected, timeout=15, what=f"{proxy.port} serves it"
        )


class Load:
    """Requests through every proxy, in a thread, until stopped: the status codes seen."""

    def __init__(self, proxies: list[ProxyProcess]) -> None:
        self.proxies = proxies
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = http_client()
        i = 0
        while not self._stop.is_set():
            for proxy in self.proxies:
                i += 1
                try:
                    response = client.get(f"{proxy.base_url}/load/{i}", headers={"X-User-Id": f"u{i}"})
                    self.statuses[response.status_code] += 1
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)

    def assert_no_failures(self) -> None:
        assert self.errors == []
        assert sum(self.statuses.values()) > 50, self.statuses
        assert all(status < 500 for status in self.statuses), self.statuses


def failover_under_load(
    proxies: list[ProxyProcess], origin: RawOrigin, kill: Callable[[], None], promoted: Callable[[], bool]
) -> str:
    """Traffic through every proxy while ``kill`` takes the master down and a replica takes over
    (``promoted``): no 5xx; then a change through the second proxy is served by all of them.
    Returns the figures, for the test's output."""
    with Load(proxies).running() as load:
        started = time.monotonic()
        kill()
        wait_for(promoted, timeout=20, interval=0.1, what="a replica promoted")
        at_promoted = time.monotonic() - started
        change(proxies[1], {"banner": {"enabled": False}, "after": {"enabled": True}})
        at_written = time.monotonic() - started
        wait_served(proxies, origin, {"banner": False, "after": True})
        at_served = time.monotonic() - started
    load.assert_no_failures()
    return (
        f"master killed → replica promoted {at_promoted:.1f}s, first write accepted {at_written:.1f}s, "
        f"served by both instances {at_served:.1f}s; {sum(load.statuses.values())} requests meanwhile, "
        f"statuses {dict(load.statuses)}"
    )


def store_lines(proxy: ProxyProcess, logger: str = "flagproxy.store") -> list[tuple[str, str]]:
    """(level, message) of the store's log lines (the JSON log on stderr)."""
    out = []
    for line in proxy.stderr().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("logger") == logger:
                out.append((event["level"], event["msg"]))
    return out


# --- settings ---------------------------------------------------------------------------------------


def test_sentinel_and_cluster_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "flagproxy.toml"
    config.write_text(
        '[store]\nsentinels = ["10.0.0.1:26379", "10.0.0.2:26379"]\nsentinel_master = "flags"\n'
    )
    s = load_settings(config_file=config, env={}).store
    assert (s.sentinels, s.sentinel_master, s.uses_redis) == (
        ("10.0.0.1:26379", "10.0.0.2:26379"),
        "flags",
        True,
    )
    env = {"FLAGPROXY_STORE_SENTINELS": "a:1, b:2", "FLAGPROXY_STORE_SENTINEL_MASTER": "m"}
    s = load_settings(config_file=config, env=env).store
    assert (s.sentinels, s.sentinel_master) == (("a:1", "b:2"), "m")
    env = {"FLAGPROXY_STORE_REDIS_CLUSTER": "true", "FLAGPROXY_STORE_REDIS_URL": "redis://10.0.0.5:7000"}
    s = load_settings(env=env).store
    assert s.redis_cluster and s.uses_redis


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"sentinels": ["10.0.0.1:26379"]}, "[store] sentinel_master"),
        ({"sentinel_master": "flags"}, "[store] sentinels"),
        ({"sentinels": ["10.0.0.1"], "sentinel_master": "m"}, "[store] sentinels: expected host:port"),
        ({"sentinels": ["h:99999"], "sentinel_master": "m"}, "[store] sentinels: expected host:port"),
        ({"sentinels": ["h:1"], "sentinel_master": "m", "redis_cluster": True}, "not both"),
        ({"sentinels": ["h:1"], "sentinel_master": "m", "redis_url": "unix:///r.sock"}, "not unix://"),
        ({"redis_cluster": True}, "[store] redis_cluster: needs [store] redis_url"),
        ({"redis_cluster": True, "redis_url": "redis://h:7000/2"}, "database 0"),
    ],
)
def test_bad_redis_settings_name_the_setting(tmp_path: Path, store: dict[str, Any], message: str) -> None:
    lines = ["[store]"] + [f"{k} = {json.dumps(v)}" for k, v in store.items()]
    (tmp_path / "c.toml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=tmp_path / "c.toml", env={})
    assert message in str(caught.value)


def test_with_sentinels_the_url_gives_the_masters_credentials_database_and_tls_only() -> None:
    """Nothing connects here: the clients are lazy. The sentinels get the TLS options, not the
    master's password."""
    settings = StoreSettings(
        sentinels=("127.0.0.1:26379",),
        sentinel_master="flags",
        redis_url="rediss://flagproxy:p%40ss@/2?ssl_ca_certs=/etc/ca.pem",
    )
    client = connect.async_client(settings)
    pool = client.connection_pool
    options = pool.connection_kwargs
    assert (options["username"], options["password"], options["db"]) == ("flagproxy", "p@ss", 2)
    assert options["ssl_ca_certs"] == "/etc/ca.pem" and "host" not in options
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    (sentinel,) = pool.sentinel_manager.sentinels
    asked = sentinel.connection_pool.connection_kwargs
    assert (asked["host"], asked["port"], asked["password"], asked["ssl_ca_certs"]) == (
        "127.0.0.1",
        26379,
        None,
        "/etc/ca.pem",
    )
    assert connect.where(settings) == "sentinel master 'flags' via 127.0.0.1:26379"


# --- TLS and an ACL user -------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tmp_path / "tls").start()
    yield server
    server.close()


def test_tls_and_an_acl_user(tls_redis: TlsRedisServer, origin: RawOrigin, tmp_path: Path) -> None:
    namespace = unique_namespace("tls")
    env = env_for(namespace)
    a, b = start_proxies(origin, tmp_path, env, ("--redis-url", tls_redis.url))
    try:
        change(a, {"banner": {"enabled": True}})
        wait_served([a, b], origin, {"banner": True})
        stored = tls_redis.client().hget(f"flagproxy:{namespace}:native:flags", "banner")
        assert json.loads(stored) == {"enabled": True}
        with contextlib.closing(RedisBackend(settings=StoreSettings(redis_url=tls_redis.url))) as backend:
            backend.apply([ExposureRecord("exp", "u1", "on", 1.0)], [])
            counts = backend.counts("exp")
            assert counts is not None and counts.users == {"on": 1}
    finally:
        for proxy in (a, b):
            proxy.stop()
    # the wrong password: the proxy serves its flags file and says why it cannot use Redis
    wrong = tls_redis.url.replace(tls_redis.password, "not-the-password-123")
    with ProxyProcess([origin.url], flags=SEED, env=env, args=["--redis-url", wrong], tmp_dir=tmp_path) as c:
        wait_for(lambda: any("Redis unreachable at start" in m for _, m in store_lines(c)), what="the log")
        logged = next(m for _, m in store_lines(c) if "Redis unreachable at start" in m)
        assert "invalid username-password pair" in logged and f":{tls_redis.port}/0" in logged
        assert "not-the-password-123" not in c.stderr()


# --- Sentinel ----------------------------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelDeployment]:
    deployment = SentinelDeployment(tmp_path / "sentinel")
    try:
        yield deployment.start()
    finally:
        deployment.close()


@pytest.mark.slow  # a failover under load: make test-slow
def test_sentinel_failover_under_load(
    sentinel: SentinelDeployment, origin: RawOrigin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace = unique_namespace("sentinel")
    env = env_for(
        namespace, FLAGPROXY_STORE_SENTINELS=sentinel.address, FLAGPROXY_STORE_SENTINEL_MASTER=sentinel.name
    )
    proxies = start_proxies(origin, tmp_path, env)
    try:
        change(proxies[0], {"banner": {"enabled": True}})
        wait_served(proxies, origin, {"banner": True})
        assert sentinel.master.client().hget(f"flagproxy:{namespace}:native:flags", "banner")
        through = StoreSettings(
            sentinels=(sentinel.address,), sentinel_master=sentinel.name, environment=namespace
        )
        with contextlib.closing(RedisBackend(settings=through)) as backend:
            backend.apply([ExposureRecord("exp", "u1", "on", 1.0)], [])
        assert sentinel.master.client().hgetall(f"flagproxy:{namespace}:exp:{{exp}}:counts")["u:on"] == "1"
        sentinel.master.client().execute_command("WAIT", 1, 2000)  # on the replica before the crash
        figures = failover_under_load(
            proxies,
            origin,
            sentinel.master.kill,
            lambda: sentinel.sentinel.master_port_now() == sentinel.replica.port,
        )
        with capsys.disabled():
            print(f"\nSentinel failover: {figures}")
        stored = sentinel.replica.client().hgetall(f"flagproxy:{namespace}:native:flags")
        assert json.loads(stored["after"]) == {"enabled": True}
    finally:
        for proxy in proxies:
            proxy.stop()


# --- Cluster ---------------------------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterDeployment]:
    deployment = RedisClusterDeployment(tmp_path / "cluster")
    try:
        yield deployment.start()
    finally:
        deployment.close()


def cluster_keys(deployment: RedisClusterDeployment, pattern: str) -> dict[str, int]:
    """Every key matching ``pattern`` on any node, with its slot."""
    out = {}
    for node in deployment.all_nodes():
        if node.running:
            client = node.client()
            for key in client.scan_iter(match=pattern):
                out[key] = int(client.execute_command("CLUSTER", "KEYSLOT", key))
    return out


async def claim_twice(settings: StoreSettings) -> tuple[list[str], list[str]]:
    """The digest claims of two instances on one day: the first wins both flags."""
    client = connect.async_client(settings)
    try:
        ledger = RedisLedger(client, connect.key_base(settings))
        return await ledger.claim_digest("2026-12-01", ["a", "b"]), await ledger.claim_digest(
            "2026-12-01", ["a", "b"]
        )
    finally:
        await client.aclose()


@pytest.mark.slow  # a three-master cluster and a failover under load: make test-slow
def test_cluster_one_slot_changes_reach_every_instance_and_a_failover_under_load(
    redis_cluster: RedisClusterDeployment,
    origin: RawOrigin,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace = unique_namespace("cluster")
    tag = f"{{flagproxy:{namespace}}}"
    owner = redis_cluster.owner_of(tag)
    replica = redis_cluster.add_replica(owner)
    env = env_for(namespace, FLAGPROXY_STORE_REDIS_CLUSTER="true", FLAGPROXY_LIFECYCLE_FLUSH_INTERVAL_S="0.3")
    # the URL names a node that does not hold the slot: any node will do
    other = next(node for node in redis_cluster.nodes if node is not owner)
    proxies = start_proxies(origin, tmp_path, env, ("--redis-url", other.url.rsplit("/", 1)[0]))
    try:
        change(proxies[0], {"banner": {"enabled": True}})
        wait_served(proxies, origin, {"banner": True})
        wait_for(lambda: f"{tag}:lifecycle:first_seen" in cluster_keys(redis_cluster, f"{tag}:*"))
        keys = cluster_keys(redis_cluster, f"{tag}:*")
        assert {f"{tag}:native:flags", f"{tag}:version", f"{tag}:audit"} <= set(keys)
        assert len(set(keys.values())) == 1, keys  # one slot: the scripts stay atomic
        assert asyncio.run(
            claim_twice(StoreSettings(redis_url=redis_cluster.url, redis_cluster=True, environment=namespace))
        ) == (["a", "b"], [])

        with contextlib.closing(
            RedisBackend(settings=StoreSettings(redis_url=redis_cluster.url, redis_cluster=True))
        ) as backend:
            backend.apply(
                [ExposureRecord("exp", "u1", "on", 1.0), ExposureRecord("exp2", "u1", "a", 1.0)], []
            )
            assert backend.flags() == ["exp", "exp2"]
            counts = backend.counts("exp")
            assert counts is not None and counts.users == {"on": 1}

        owner.client().execute_command("WAIT", 1, 2000)
        figures = failover_under_load(
            proxies, origin, owner.kill, lambda: replica.client().execute_command("ROLE")[0] == "master"
        )
        with capsys.disabled():
            print(f"\nCluster failover: {figures}")
        assert json.loads(replica.client().hget(f"{tag}:native:flags", "after")) == {"enabled": True}
    finally:
        for proxy in proxies:
            proxy.stop()


# --- the log while Redis is away ---------------------------------------------------------------------------


def test_an_outage_is_one_warning_and_one_recovery_line(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    env = env_for(
        unique_namespace("outage"),
        FLAGPROXY_STORE_RECONNECT_MAX_S="0.1",
        FLAGPROXY_LIFECYCLE_FLUSH_INTERVAL_S="0.1",  # the ledger's writes fail every 0.1 s too
    )
    (proxy,) = start_proxies(
        origin, tmp_path, env, ("--redis-url", fresh_redis.url), count=1, log_level="info"
    )
    try:
        wait_for(lambda: ("info", "connected") in [(lv, m.split(" ", 1)[0]) for lv, m in store_lines(proxy)])
        first = store_lines(proxy)
        assert ("info", "initialised Redis from the flags file (it held no flagproxy data)") in first
        assert [line for line in first if line[0] in ("warning", "error")] == []
        # a normal start says nothing alarming elsewhere either (the ledger waited for the store)
        assert [m for lv, m in store_lines(proxy, "flagproxy.lifecycle") if lv == "warning"] == []

        fresh_redis.kill()
        wait_for(lambda: any(lv == "warning" for lv, _ in store_lines(proxy)), what="the outage logged")
        time.sleep(1.5)  # Redis stays away for 1.5 s: about fifteen retries
        assert served_flags(proxy, origin) == {"banner": False}
        fresh_redis.start()  # empty again: re-seeded from what this instance served
        wait_for(lambda: any("available again" in m for _, m in store_lines(proxy)), what="the recovery")

        during = store_lines(proxy)[len(first) :]
        warnings = [m for level, m in during if level == "warning"]
        assert len(warnings) == 1 and warnings[0].startswith("Redis unavailable"), during
        recovered = [m for level, m in during if level == "info" and "available again" in m]
        assert len(recovered) == 1, during
        failures = int(recovered[0].split(" failed attempt")[0].rsplit(" ", 1)[1])
        assert failures >= 5, recovered  # counted, not logged
        # the lifecycle's ledger says so once too, unless the outage came before its first write
        # reached the store (the store's own lines cover that); a warning is followed by its end
        lifecycle = [m for level, m in store_lines(proxy, "flagproxy.lifecycle") if level == "warning"]
        assert len(lifecycle) <= 1, lifecycle
        if lifecycle:
            wait_for(
                lambda: any(
                    "reach the store again" in m for _, m in store_lines(proxy, "flagproxy.lifecycle")
                ),
                what="the lifecycle's recovery",
            )
    finally:
        proxy.stop()


def test_a_write_a_replica_refuses_is_503_nothing_applied(origin: RawOrigin, tmp_path: Path) -> None:
    """READONLY (a demoted master, mid-failover) is a refusal before anything ran: 503, not 504."""
    master = MasterServer(dir=tmp_path / "master").start()
    replica = ReplicaServer(tmp_path / "replica", master.port).start()
    try:
        replica.wait_synced()
        env = env_for(unique_namespace("readonly"))
        (a,) = start_proxies(origin, tmp_path / "a", env, ("--redis-url", master.url), count=1)
        master.client().execute_command("WAIT", 1, 2000)  # the seed is on the replica
        (b,) = start_proxies(origin, tmp_path / "b", env, ("--redis-url", replica.url), count=1)
        try:
            refused = post_webhook(b.base_url, {"upsert": {"banner": {"enabled": True}}}, SECRET)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "store_unavailable"
            assert served_flags(a, origin) == served_flags(b, origin) == {"banner": False}
        finally:
            a.stop()
            b.stop()
    finally:
        replica.close()
        master.close()


@pytest.mark.parametrize("case", ["nothing listening", "no cluster"])
def test_a_cluster_that_cannot_be_used_at_start_serves_the_flags_file(
    case: str, redis_server: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    """The cluster client's own exception (no RedisError) is Redis being away, not a crash loop:
    ready on the flags file, writes 503, and one ERROR saying why."""
    url, said = {
        "nothing listening": (f"redis://{LOCALHOST}:{free_port()}", "Redis Cluster cannot be connected"),
        "no cluster": (redis_server.url.rsplit("/", 1)[0], "Cluster mode is not enabled on this node"),
    }[case]
    env = env_for(unique_namespace("no-cluster"), FLAGPROXY_STORE_REDIS_CLUSTER="true")
    with ProxyProcess(
        [origin.url], flags=SEED, env=env, args=["--redis-url", url], tmp_dir=tmp_path
    ) as proxy:
        wait_for(
            lambda: http_client().get(f"{proxy.base_url}/__flags/readyz").status_code == 200, what="ready"
        )
        assert served_flags(proxy, origin) == {"banner": False}
        refused = post_webhook(proxy.base_url, {"upsert": {"banner": {"enabled": True}}}, SECRET)
        assert (refused.status_code, refused.json()["error"]) == (503, "store_unavailable")
        time.sleep(0.5)  # a few retries (every 0.2 s)
        problems = [(level, m) for level, m in store_lines(proxy) if level in ("warning", "error")]
        assert len(problems) == 1 and said in problems[0][1], problems


def test_a_master_demoted_under_a_sentinel_client_refuses_writes_with_503(
    sentinel: SentinelDeployment,
) -> None:
    """redis-py's Sentinel connection turns READONLY into a ConnectionError ("the previous master
    is now a slave"): still a refusal before anything ran, not an unknown outcome (504)."""
    settings = StoreSettings(
        sentinels=(sentinel.address,), sentinel_master=sentinel.name, environment=unique_namespace("demoted")
    )

    async def run() -> None:
        store = RedisStore(settings, fallback=RawState, compiler=DEFAULT)
        await store.start()
        try:
            for _ in range(200):  # bounded: 10 s
                if store.connected:
                    break
                await asyncio.sleep(0.05)
            applied = await store.apply(Change(source="native", upsert={"a": '{"enabled":true}'}))
            assert applied.status == "applied"
            # demoted behind the sentinel's back: the pooled connection still reaches it
            sentinel.master.client().execute_command("REPLICAOF", LOCALHOST, str(sentinel.replica.port))
            with pytest.raises(StoreUnavailable, match=r"READONLY|read only replica"):
                await store.apply(Change(source="native", upsert={"b": "{}"}))
        finally:
            await store.close()

    asyncio.run(run())
