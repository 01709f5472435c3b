"""The parts of uvicorn's httptools protocol that ``proxy.dataplane.protocol`` relies on.

pyproject.toml pins uvicorn to the versions this was checked with; this test fails first when a
uvicorn within (or beyond) the pin no longer has them, instead of a proxy failing under traffic.
"""

from __future__ import annotations

import inspect

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.dataplane.protocol import UVICORN_PRIVATE_API, ProxyHttpProtocol


def test_uvicorn_still_has_every_private_method_the_protocol_calls() -> None:
    missing = [name for name in UVICORN_PRIVATE_API if not callable(getattr(HttpToolsProtocol, name, None))]
    assert missing == []


def test_the_overridden_callbacks_exist_with_the_same_signature() -> None:
    for name in ("on_message_begin", "on_url", "on_header", "on_headers_complete", "data_received"):
        ours, theirs = getattr(ProxyHttpProtocol, name), getattr(HttpToolsProtocol, name)
        assert ours is not theirs, name
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name


def test_every_private_name_the_protocol_uses_is_declared() -> None:
    source = inspect.getsource(ProxyHttpProtocol)
    used = {name for name in dir(HttpToolsProtocol) if name.startswith("_") and not name.startswith("__")}
    called = {name for name in used if f"self.{name}(" in source}
    assert called <= set(UVICORN_PRIVATE_API)
