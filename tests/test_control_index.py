"""``GET /__flags/``: every control endpoint, whether it is on, what turns it on; never a secret."""

from __future__ import annotations

import httpx
import pytest

from proxy.app import FlagProxy
from proxy.config import load_settings

SECRETS = {
    "FLAGPROXY_ADMIN_TOKEN": "admin-token-Q7xK2mZp9",
    "FLAGPROXY_WEBHOOKS_SECRET": "webhook-secret-Q7xK2mZp9",
    "FLAGPROXY_METRICS_TOKEN": "metrics-token-Q7xK2mZp9",
    "FLAGPROXY_SPLIT_WEBHOOK_TOKEN": "split-token-Q7xK2mZp9",
    "FLAGPROXY_UNLEASH_WEBHOOK_TOKEN": "unleash-token-Q7xK2mZp9",
    "FLAGPROXY_STORE_SOURCES": "split,unleash,native",
    "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": "slack-secret-Q7xK2mZp9",
    "FLAGPROXY_CHAT_TELEGRAM_SECRET_TOKEN": "telegram-secret-Q7xK2mZp9",
    "FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": "123456:telegram-bot-Q7xK2mZp9",
    "GAME_KEY": "client-key-Q7xK2mZp9wvR",
}
CLIENT_KEYS = """
[[client_keys]]
name = "game"
key_env = "GAME_KEY"
"""


def control(env: dict[str, str], config: str = "", tmp_path: object = None) -> httpx.AsyncClient:
    path = None
    if config:
        assert tmp_path is not None
        path = tmp_path / "c.toml"  # type: ignore[operator]
        path.write_text(config)
    app = FlagProxy(load_settings(config_file=path, env=env, origins=["http://127.0.0.1:9"]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app.control), base_url="http://proxy")


async def listing(client: httpx.AsyncClient, path: str = "/__flags/") -> dict[str, dict[str, object]]:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["control_prefix"] == "/__flags"
    return {e["path"]: e for e in body["endpoints"]}


@pytest.mark.anyio
async def test_a_bare_proxy_lists_what_is_off_and_the_setting_that_turns_it_on() -> None:
    async with control({}) as client:
        endpoints = await listing(client)
        assert endpoints == await listing(client, "/__flags")  # with or without the slash
    on = {p for p, e in endpoints.items() if e["enabled"]}
    assert on == {"/__flags/", "/__flags/healthz", "/__flags/readyz", "/__flags/metrics"}
    assert endpoints["/__flags/api/flags"]["enable_with"] == "[admin] token (FLAGPROXY_ADMIN_TOKEN)"
    assert endpoints["/__flags/webhooks/native"]["enable_with"].startswith("[webhooks] secret")
    assert endpoints["/__flags/webhooks/split"]["enable_with"] == "[split] webhook_token"
    assert endpoints["/__flags/client/v1/flags"]["enable_with"].startswith("[[client_keys]]")
    assert endpoints["/__flags/chat/slack"]["enable_with"] == "[chat.slack] signing_secret"
    assert endpoints["/__flags/chat/telegram"]["enable_with"] == "[chat.telegram] secret_token"
    # every listed path is a real route: the enabled ones answer something other than 404
    async with control({}) as client:
        for path, entry in endpoints.items():
            methods = entry["methods"]
            assert isinstance(methods, list) and methods, path
            response = await client.request(methods[0], path)
            if entry["enabled"]:
                assert response.status_code not in (404, 405), (path, methods[0])
            else:  # a disabled one says so
                assert response.status_code == 404, path
                assert "disabled" in response.json()["detail"] or path.startswith("/__flags/api/"), path


@pytest.mark.anyio
async def test_everything_configured_is_on_and_no_secret_is_shown(tmp_path: object) -> None:
    async with control(SECRETS, CLIENT_KEYS, tmp_path) as client:
        response = await client.get("/__flags/")
        endpoints = await listing(client)
    assert all(e["enabled"] for e in endpoints.values()), [
        p for p, e in endpoints.items() if not e["enabled"]
    ]
    assert not any("enable_with" in e for e in endpoints.values())
    assert "/__flags/webhooks/unleash" in endpoints  # a source's webhooks, when the source is on
    assert endpoints["/__flags/metrics"]["auth"] == "Authorization: Bearer <metrics token>"
    assert endpoints["/__flags/api/flags"]["auth"] == "Authorization: Bearer <admin token>"
    for secret in SECRETS.values():
        assert secret not in response.text
        assert secret[-8:] not in response.text


@pytest.mark.anyio
async def test_the_listed_admin_paths_exist_when_enabled() -> None:
    env = {"FLAGPROXY_ADMIN_TOKEN": SECRETS["FLAGPROXY_ADMIN_TOKEN"]}
    auth = {"Authorization": f"Bearer {env['FLAGPROXY_ADMIN_TOKEN']}"}
    async with control(env) as client:
        endpoints = await listing(client)
        for path in (p for p in endpoints if p.startswith("/__flags/api/") and p != "/__flags/api/track"):
            response = await client.get(path, headers=auth, params={"key": "k"})
            assert response.status_code == 200, (path, response.text)
