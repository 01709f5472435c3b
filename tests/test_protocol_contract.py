"""The parts of uvicorn that ``proxy.dataplane.client_side.ClientConnection`` relies on.

uvicorn builds its ``http`` protocol class with ``config``, ``server_state``, ``app_state`` and
``_loop``, keeps live connections in ``server_state.connections`` and calls ``shutdown()`` on each
when it stops, waits for ``server_state.tasks``. pyproject.toml pins the minor version these were
checked on; this fails on a uvicorn that changed them.
"""

from __future__ import annotations

import inspect

import uvicorn.server
from uvicorn.server import Server, ServerState

from proxy.dataplane.client_side import ClientConnection


def test_uvicorn_builds_the_protocol_with_the_arguments_it_takes() -> None:
    source = inspect.getsource(Server.startup)
    for argument in ("config=config", "server_state=self.server_state", "app_state=", "_loop=_loop"):
        assert argument in source, argument
    parameters = inspect.signature(ClientConnection).parameters
    assert list(parameters) == ["config", "server_state", "app_state", "_loop"]


def test_uvicorn_tracks_connections_and_tasks_in_the_server_state() -> None:
    state = ServerState()
    assert isinstance(state.connections, set) and isinstance(state.tasks, set)
    assert state.total_requests == 0


def test_uvicorn_shuts_connections_down_and_waits_for_them() -> None:
    source = inspect.getsource(Server.shutdown) + inspect.getsource(Server._wait_tasks_to_complete)
    assert "connection.shutdown()" in source
    assert "self.server_state.connections" in source and "self.server_state.tasks" in source
    assert callable(ClientConnection.shutdown)
    assert uvicorn.server.__name__ == "uvicorn.server"
