"""Shared fixtures: real origins and real proxy processes, cleaned up at the end of each module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ProxyProcess, RawOrigin, RedisServer, close_http_clients, unique_namespace


@pytest.fixture(scope="session", autouse=True)
def http_clients() -> Iterator[None]:
    """The per-thread keep-alive clients of ``support.http_client`` are closed when the session ends."""
    yield
    close_http_clients()


@pytest.fixture(scope="module")
def origin_factory() -> Iterator[Callable[..., RawOrigin]]:
    """``make(**kwargs)`` → a started ``RawOrigin``; all are stopped when the module is done."""
    started: list[RawOrigin] = []

    def make(**kwargs: Any) -> RawOrigin:
        origin = RawOrigin(**kwargs).start()
        started.append(origin)
        return origin

    yield make
    for origin in started:
        origin.stop()


@pytest.fixture(scope="module")
def proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ProxyProcess]]:
    """``make(origins, config=..., flags=..., env=...)`` → a running ``flagproxy serve`` subprocess."""
    started: list[ProxyProcess] = []

    def make(*args: Any, **kwargs: Any) -> ProxyProcess:
        kwargs.setdefault("tmp_dir", tmp_path_factory.mktemp("proxy"))
        proxy = ProxyProcess(*args, **kwargs)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def origin(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    """One scripted origin shared by a module's tests (use distinct paths per test)."""
    return origin_factory()


# --- a private Redis (never the machine's shared instance) ---------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session on a free port; tests keep to their own namespace
    (``[store] environment``, see ``redis_namespace``) and never flush it."""
    server = RedisServer(dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for destructive tests (kill, restart): stopped afterwards."""
    server = RedisServer(dir=tmp_path / "redis").start()
    yield server
    server.close()


@pytest.fixture
def redis_namespace(request: pytest.FixtureRequest) -> str:
    """This test's own ``[store] environment`` (FLAGPROXY_STORE_ENVIRONMENT) on a shared Redis."""
    return unique_namespace(request.node.name)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, like the proxy."""
    return "asyncio"
