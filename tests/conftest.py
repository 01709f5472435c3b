"""Shared fixtures: real origins and real proxy processes, cleaned up at the end of each module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import ProxyProcess, RawOrigin


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
