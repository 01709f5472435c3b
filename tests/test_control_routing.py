"""The control plane's answers to unknown routes and methods, with and without an admin token.

In-process (the Starlette app only): these are routing decisions, no origin is involved.
"""

from __future__ import annotations

import httpx
import pytest

from proxy.app import FlagProxy
from proxy.config import load_settings


def control(token: str) -> httpx.AsyncClient:
    env = {"FLAGPROXY_ADMIN_TOKEN": token} if token else {}
    app = FlagProxy(load_settings(env=env, origins=["http://127.0.0.1:9"]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app.control), base_url="http://proxy")


@pytest.mark.parametrize(
    ("token", "sent", "method", "path", "status", "error"),
    [
        ("", None, "POST", "/__flags/api/flags", 405, "method_not_allowed"),
        ("", None, "GET", "/__flags/api/flags", 404, "not_found"),
        ("", None, "GET", "/__flags/api/nope", 404, "not_found"),
        ("tok", None, "POST", "/__flags/api/flags", 405, "method_not_allowed"),
        ("tok", None, "DELETE", "/__flags/api/evaluate", 405, "method_not_allowed"),
        ("tok", None, "GET", "/__flags/api/nope", 404, "not_found"),
        ("tok", None, "GET", "/__flags/api/flags", 401, "unauthorized"),
        ("tok", "tok", "GET", "/__flags/api/nope", 404, "not_found"),
        ("tok", "tok", "PATCH", "/__flags/api/flags/x", 405, "method_not_allowed"),
        ("tok", "bad", "GET", "/__flags/api/audit", 401, "unauthorized"),
    ],
)
@pytest.mark.anyio
async def test_routing_comes_before_authentication(
    token: str, sent: str | None, method: str, path: str, status: int, error: str
) -> None:
    headers = {"Authorization": f"Bearer {sent}"} if sent else {}
    async with control(token) as client:
        response = await client.request(method, path, headers=headers)
    assert (response.status_code, response.json()["error"]) == (status, error)
    assert ("www-authenticate" in response.headers) == (status == 401)


@pytest.mark.anyio
async def test_error_bodies_are_compact_utf8_json() -> None:
    async with control("") as client:
        response = await client.get("/__flags/nöpe")
    assert response.content == '{"error":"not_found","detail":"no control endpoint /__flags/nöpe"}'.encode()
