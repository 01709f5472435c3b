"""Every Redis client flagproxy opens is built here, from ``[store]`` (docs/store.md, "Deployments"):

- one server: ``redis_url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; ACL user and password
  in the URL, TLS files as its query: ``?ssl_ca_certs=/etc/ca.pem``);
- Sentinel: ``sentinels`` + ``sentinel_master``; the master's address comes from the sentinels,
  ``redis_url`` (optional then) gives only the scheme, credentials, database and TLS options;
- Cluster: ``redis_cluster = true``, ``redis_url`` naming any node.

In Cluster mode the store's keys (and the ledger's) carry one hash tag, ``{prefix:environment}``, so
they live in one slot: its Lua scripts and transactions touch one node and stay atomic. Announcements
then go by sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``), which a node delivers to its own
subscribers: this module subscribes on the node that owns the slot and says when the slot moved.
The key names of a single server or Sentinel deployment do not change (no migration).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection
from redis.asyncio.connection import parse_url as parse_async_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from proxy.config import StoreSettings

AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
SyncClient = redis.Redis | redis.cluster.RedisCluster

# What a Redis call raises when Redis is away, refuses or is mid-failover. The cluster client raises
# RedisClusterException, which is no RedisError, when no node answers its CLUSTER SLOTS (or the
# node named is not in cluster mode).
FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)


CLOSE_TIMEOUT_S = 1.0  # longest a close waits for Redis's side of a connection


def key_base(settings: StoreSettings) -> str:
    """``prefix:environment``; in Cluster mode ``{prefix:environment}``, one hash tag for every key."""
    base = f"{settings.redis_prefix}:{settings.environment}"
    return f"{{{base}}}" if settings.redis_cluster else base


def publish_command(settings: StoreSettings) -> str:
    """The command the scripts announce changes with: sharded pub/sub in Cluster mode."""
    return "SPUBLISH" if settings.redis_cluster else "PUBLISH"


def where(settings: StoreSettings) -> str:
    """Where the store is, for messages (never the credentials)."""
    if settings.sentinels:
        return f"sentinel master {settings.sentinel_master!r} via {','.join(settings.sentinels)}"
    parts = urlsplit(settings.redis_url)
    kind = "cluster " if settings.redis_cluster else ""
    return f"{kind}{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def sentinel_addresses(settings: StoreSettings) -> list[tuple[str, int]]:
    """``host:port`` entries as pairs (the settings were validated: every entry has a port)."""
    out: list[tuple[str, int]] = []
    for entry in settings.sentinels:
        host, _, port = entry.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _url_options(settings: StoreSettings) -> dict[str, Any]:
    """The connection options ``redis_url`` carries, without its address (for Sentinel)."""
    options: dict[str, Any] = dict(parse_async_url(settings.redis_url or "redis://"))
    for name in ("host", "port", "path"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def _sentinel_options(options: dict[str, Any], timeouts: dict[str, Any]) -> dict[str, Any]:
    """How to reach the sentinels: the master's TLS options, never its credentials."""
    tls = {k: v for k, v in options.items() if k == "ssl" or k.startswith("ssl_")}
    return {**timeouts, **tls}


def _timeouts(settings: StoreSettings) -> dict[str, Any]:
    timeout = settings.redis_timeout_s
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def async_client(settings: StoreSettings) -> AsyncClient:
    """The store's client (text replies; no retry on a timeout: the store decides what a late answer
    means)."""
    common: dict[str, Any] = {"decode_responses": True, "retry_on_timeout": False, **_timeouts(settings)}
    if settings.sentinels:
        options = _url_options(settings)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]  # untyped upstream
            sentinel_addresses(settings),
            sentinel_kwargs=_sentinel_options(options, _timeouts(settings)),
            **options,
        )
        master: redis.asyncio.Redis = sentinel.master_for(
            settings.sentinel_master, redis_class=redis.asyncio.Redis, **common
        )
        return master
    if settings.redis_cluster:
        common.pop("retry_on_timeout")  # no option of the cluster client (a TypeError)
        return redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, **common)
    return redis.asyncio.Redis.from_url(settings.redis_url, **common)


def sync_client(settings: StoreSettings, **extra: Any) -> SyncClient:
    """A blocking client on the same deployment (the experiment backend's writer thread)."""
    common = {**_timeouts(settings), **extra}
    if settings.sentinels:
        options = _url_options(settings)
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]  # untyped upstream
            sentinel_addresses(settings),
            sentinel_kwargs=_sentinel_options(options, _timeouts(settings)),
            **options,
        )
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]  # untyped upstream
            settings.sentinel_master, redis_class=redis.Redis, **common
        )
        return master
    if settings.redis_cluster:
        common.pop("retry", None)  # the cluster client retries on its own, across nodes
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **common)
    return redis.Redis.from_url(settings.redis_url, **common)


async def aclose(client: AsyncClient) -> None:
    """Close ``client`` and, under Sentinel, its connections to the sentinels (the master's client
    does not own those). Bounded like ``Subscription.aclose``: a shutdown never waits on Redis."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S)
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def close(client: SyncClient) -> None:
    """``aclose`` for a blocking client."""
    client.close()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


@contextlib.asynccontextmanager
async def connection_for(client: AsyncClient, key: str) -> AsyncIterator[AbstractConnection]:
    """A connection of its own to the server that holds ``key`` (the store's writes send their
    script on one connection, to tell a failure before sending from one after)."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        node = await _node_for(client, key)
        connection = node.acquire_connection()
        try:
            yield connection
        finally:
            node.release(connection)
        return
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped upstream
    try:
        yield connection
    finally:
        await pool.release(connection)


async def _node_for(
    client: redis.asyncio.cluster.RedisCluster, key: str
) -> redis.asyncio.cluster.ClusterNode:
    """The primary that holds ``key``'s slot (from the client's slot map, read at the first use)."""
    await client.initialize()
    node = client.get_node_from_key(key)
    if node is None:
        raise RedisConnectionError(f"no Cluster node holds the slot of {key!r}")
    return node


async def refresh(client: AsyncClient) -> None:
    """After a connection failure in Cluster mode: read the slots again (a replica may have taken
    over); best effort, the next attempt says what is wrong."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        with contextlib.suppress(*FAILURES):
            await client.nodes_manager.initialize()


class Subscription:
    """The store's change channel: plain pub/sub, or in Cluster mode sharded pub/sub on the node
    that owns the channel's slot."""

    def __init__(self, pubsub: PubSub, owner: redis.asyncio.Redis | None = None) -> None:
        self.pubsub = pubsub
        self._owner = owner  # the client made for the slot's node, closed with the subscription

    async def get(self, timeout: float) -> str | None:
        """The next message's data, or None within ``timeout``. The slot moving away (a failover, a
        reshard: Redis unsubscribes the channel) is a ``ConnectionError``: subscribe again."""
        message = await self.pubsub.get_message(ignore_subscribe_messages=False, timeout=timeout)
        if message is None:
            return None
        kind = message.get("type")
        if kind in ("sunsubscribe", "unsubscribe"):
            raise RedisConnectionError("Redis unsubscribed the change channel (its slot moved)")
        if kind in ("message", "smessage"):
            data: str = message["data"]
            return data
        return None

    async def aclose(self) -> None:
        # Bounded: closing a subscription cancelled in the middle of a read can wait forever for
        # its connection to close (seen at shutdown right after connecting), holding the shutdown.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pubsub.aclose(), CLOSE_TIMEOUT_S)  # type: ignore[no-untyped-call]
        if self._owner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._owner.aclose(), CLOSE_TIMEOUT_S)


async def subscribe(client: AsyncClient, channel: str) -> Subscription:
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        return Subscription(pubsub)
    node = await _node_for(client, channel)
    options: dict[str, Any] = dict(node.connection_kwargs)  # the node's address, TLS, credentials
    options.pop("event_dispatcher", None)
    pool = ConnectionPool(connection_class=node.connection_class, **options)
    owner = redis.asyncio.Redis.from_pool(pool)
    subscription = Subscription(owner.pubsub(), owner)
    try:
        await subscription.pubsub.ssubscribe(channel)
    except BaseException:
        await subscription.aclose()
        raise
    return subscription
