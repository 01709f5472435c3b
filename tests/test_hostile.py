"""Hostile input: control-plane path tricks, unknown sources, fuzzed webhook bodies, secrets, load."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import post_webhook, raw_exchange, raw_request

from proxy.engine import FlagError
from proxy.sources.native.document import change_from_payload

SECRET = "hostile-webhook-secret-0123456789"
TOKEN = "hostile-admin-token-0123456789"
SLACK = "http://127.0.0.1:9/services/T000/B000/hostile-slack-secret"


@pytest.fixture(scope="module")
def proxy(proxy_factory, origin):
    env = {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_ALERTS_SLACK_WEBHOOK_URL": SLACK,
        "FLAGPROXY_SPLIT_WEBHOOK_TOKEN": "hostile-split-token-0123456789",
    }
    return proxy_factory([origin.url], flags={"flags": {"k": {"enabled": True}}}, env=env, log_level="info")


@pytest.mark.parametrize(
    "target",
    [
        "/__flags/../api/x",
        "/__flags/%2e%2e/api/x",
        "/__flags/api%2Fflags",
        "/__flags/api/flags/..%2F..%2Fapi",
        "/%5F%5Fflags/healthz",
        "/__flags//api/flags",
    ],
)
def test_control_plane_path_tricks_never_reach_the_origin_or_admin(proxy, origin, target: str) -> None:
    before = len(origin.requests)
    response = raw_exchange(proxy.port, raw_request("GET", target))
    assert response.status in (200, 400, 401, 404), response.status
    if response.status != 200:
        assert json.loads(response.body)["error"]
    else:  # only a probe may answer 200 here
        assert json.loads(response.body) == {"status": "ok"}
    assert len(origin.requests) == before  # a control-plane-looking path is never forwarded


def test_unknown_webhook_sources_are_404(proxy) -> None:
    response = raw_exchange(
        proxy.port, raw_request("POST", "/__flags/webhooks/launchdarkly", [("Content-Length", "2")], b"{}")
    )
    assert response.status == 404 and json.loads(response.body)["error"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        b"{" * 100_000,
        b"[" * 50_000 + b"]" * 50_000,
        b'{"flags": ' * 5000,
        b"\xff\xfe\x00",
        b'"\\ud800"',
        b"1e999999",
    ],
)
def test_pathological_json_gets_a_4xx_and_changes_nothing(proxy, body: bytes) -> None:
    before = admin_get(proxy, "/__flags/api/flags")
    response = post_webhook(proxy.base_url, body=body, secret=SECRET)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) >= {"error", "detail"}
    assert admin_get(proxy, "/__flags/api/flags") == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(
    payload=json_values
    | st.fixed_dictionaries({"flags": st.dictionaries(st.text(max_size=6), json_values)})
    | st.fixed_dictionaries(
        {"upsert": st.dictionaries(st.text(max_size=6), json_values), "delete": json_values}
    )
)
def test_fuzzed_native_payloads_are_either_a_change_or_a_flag_error(payload: Any) -> None:
    try:
        change = change_from_payload(payload, actor="fuzz")
    except FlagError:
        return
    assert change.source == "native"
    assert all(isinstance(text, str) for text in change.upsert.values())


def admin_get(proxy, path: str) -> Any:
    response = raw_exchange(proxy.port, raw_request("GET", path, [("Authorization", f"Bearer {TOKEN}")]))
    assert response.status == 200
    return json.loads(response.body)


def test_secrets_never_appear_in_error_bodies_or_logs(proxy) -> None:
    bodies = [
        post_webhook(proxy.base_url, body=b"{}", signature="sha256=" + "0" * 64).text,
        raw_exchange(
            proxy.port, raw_request("GET", "/__flags/api/flags", [("Authorization", "Bearer nope")])
        ).body,
        raw_exchange(
            proxy.port,
            raw_request("POST", "/__flags/webhooks/split?token=nope", [("Content-Length", "2")], b"{}"),
        ).body,
    ]
    text = "".join(b.decode() if isinstance(b, bytes) else b for b in bodies) + proxy.stderr()
    for secret in (SECRET, TOKEN, "hostile-slack-secret", "hostile-split-token"):
        assert secret not in text


@pytest.mark.slow  # a load test: make test-slow
def test_ten_thousand_requests_at_c256_without_errors(proxy, origin) -> None:
    async def run() -> list[int]:
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=connector) as session:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(10_000):
                queue.put_nowait(i)
            statuses: list[int] = []

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    headers = {"X-User-Id": f"load-{i % 500}"}
                    async with session.get(f"{proxy.base_url}/load/{i}", headers=headers) as response:
                        await response.read()
                        statuses.append(response.status)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(256))), timeout=120)
            return statuses

    statuses = asyncio.run(run())
    assert len(statuses) == 10_000
    assert set(statuses) == {200}
