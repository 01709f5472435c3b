"""The admin API (``/__flags/api/*``), the native webhook on the memory store, and ``flagproxy flags``.

Every admin test runs against both stores: the embedded memory store and Redis. What a change does
is checked where it matters, in the X-Feature-Flags header the origin receives.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import mmh3
import pytest
from support import (
    PYTHON,
    REPO,
    ProxyProcess,
    RawOrigin,
    RedisServer,
    clean_env,
    free_port,
    http_client,
    post_webhook,
    served_flags,
    unique_namespace,
    wait_for,
)

SECRET = "admin-test-secret"
TOKEN = "s3cret-admin-token"
AUDIT_MAX = 6
FLAGS = {
    "flags": {
        "layout": {
            "variants": {"classic": {"weight": 50}, "compact": {"weight": 50, "config": {"rows": 3}}},
            "defaultVariant": "classic",
            "rules": [
                {"if": {"==": [{"var": "country"}, "NZ"]}, "variant": "compact"},
                {"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "classic"},
            ],
        },
        "by-team": {
            "variants": {"x": {"weight": 1}, "y": {"weight": 1}},
            "defaultVariant": "x",
            "bucketBy": "team",
        },
        "off": {"enabled": False},
        "shop-only": {"routes": ["/shop/**"]},
    }
}
TWO_WAY = {"variants": {"a": {"weight": 50}, "b": {"weight": 50}}, "defaultVariant": "a"}
USERS = [f"user-{i}" for i in range(24)]

ROUTES = [
    ("GET", "/api/flags"),
    ("GET", "/api/flags/layout"),
    ("PUT", "/api/flags/layout"),
    ("DELETE", "/api/flags/layout"),
    ("POST", "/api/flags/layout/kill"),
    ("POST", "/api/flags/layout/promote"),
    ("POST", "/api/flags/layout/restore"),
    ("GET", "/api/evaluate?key=u1"),
    ("GET", "/api/audit"),
]


class Admin:
    """The admin API of one proxy, with the right token unless told otherwise."""

    def __init__(self, proxy: ProxyProcess, store: str) -> None:
        self.proxy = proxy
        self.store = store
        self.base = f"{proxy.base_url}/__flags/api"

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}".strip()} if token is not None else {}
        if body is not None:
            kw["content"] = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return http_client().request(method, self.base + path, headers=headers, **kw)

    def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = self.call(method, path, body)
        assert response.status_code == 200, (method, path, response.status_code, response.text)
        return response.json()

    def version(self) -> int:
        return self.ok("GET", "/flags")["version"]

    def evaluate(self, **params: str) -> dict[str, Any]:
        return self.ok("GET", "/evaluate?" + str(httpx.QueryParams(params)))


@pytest.fixture(scope="module")
def admin_proxies(
    redis_server: RedisServer, origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> dict[str, ProxyProcess]:
    env = {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_AUDIT_MAX": str(AUDIT_MAX),
    }
    memory = proxy_factory([origin.url], flags=FLAGS, env=env)
    redis_env = {**env, "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("admin")}
    redis = proxy_factory([origin.url], flags=FLAGS, env=redis_env, args=["--redis-url", redis_server.url])
    wait_for(lambda: http_client().get(f"{redis.base_url}/__flags/readyz").status_code == 200)
    return {"memory": memory, "redis": redis}


@pytest.fixture(params=["memory", "redis"])
def admin(request: pytest.FixtureRequest, admin_proxies: dict[str, ProxyProcess]) -> Admin:
    return Admin(admin_proxies[request.param], request.param)


@pytest.fixture(scope="module")
def no_token_proxy(origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    """Memory store, no admin token and no webhook secret: the control plane is just the probes."""
    return proxy_factory([origin.url], flags=FLAGS)


def served_many(proxy: ProxyProcess, origin: RawOrigin, flag: str) -> set[Any]:
    return {served_flags(proxy, origin, user=user).get(flag) for user in USERS}


# --- access ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_without_a_token_configured_every_api_route_is_404(
    no_token_proxy: ProxyProcess, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer"}):
        response = http_client().request(
            method, f"{no_token_proxy.base_url}/__flags{path}", headers=headers, content=b'{"variant": "x"}'
        )
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found"
        assert response.json()["detail"] == (
            "the admin API is disabled: set [admin] token (FLAGPROXY_ADMIN_TOKEN) to enable "
            f"/__flags{path.partition('?')[0]}"
        )


def test_without_a_secret_the_webhook_is_404_and_probes_work(no_token_proxy: ProxyProcess) -> None:
    response = post_webhook(no_token_proxy.base_url, {"upsert": {"x": {}}}, "whatever")
    assert (response.status_code, response.json()["error"]) == (404, "not_found")
    base = f"{no_token_proxy.base_url}/__flags"
    assert http_client().get(f"{base}/healthz").json() == {"status": "ok"}
    assert http_client().get(f"{base}/readyz").json() == {"status": "ready", "version": 1, "flags": 4}


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_the_token_is_required(admin: Admin, method: str, path: str) -> None:
    version = admin.version()
    body = {"variant": "classic"} if path.endswith("promote") else None
    if method == "PUT":
        body = {"enabled": False}
    path = path.removeprefix("/api")
    for token in (None, "wrong", TOKEN[:-1], TOKEN + "x", ""):
        response = admin.call(method, path, body, token=token)
        assert response.status_code == 401, (token, response.text)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    basic = http_client().request(method, admin.base + path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert admin.version() == version  # nothing was changed by any of them


def test_the_right_token_is_accepted(admin: Admin) -> None:
    listed = admin.call("GET", "/flags")
    assert listed.status_code == 200
    assert set(listed.json()["flags"]) >= {"layout", "by-team", "off", "shop-only"}
    lower = http_client().get(f"{admin.base}/flags", headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200


def test_unknown_api_routes_and_methods(admin: Admin) -> None:
    missing = admin.call("GET", "/nope")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    wrong_method = admin.call("PATCH", "/flags/layout")
    assert (wrong_method.status_code, wrong_method.json()["error"]) == (405, "method_not_allowed")


# --- flags: get, put, delete ---------------------------------------------------------------------------


def test_get_put_delete_a_flag(admin: Admin, origin: RawOrigin) -> None:
    proxy = admin.proxy
    unknown = admin.call("GET", "/flags/crud")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_flag")

    created = admin.ok("PUT", "/flags/crud", {"enabled": True, "updatedAt": "2025-02-01T00:00:00Z"})
    assert (created["status"], created["changed"]) == ("applied", ["crud"])
    assert served_flags(proxy, origin)["crud"] is True
    got = admin.ok("GET", "/flags/crud")
    assert got == {
        "key": "crud",
        "source": "native",
        "definition": {"enabled": True, "updatedAt": "2025-02-01T00:00:00Z"},
        "version": created["version"],
    }
    assert admin.ok("GET", "/flags")["flags"]["crud"]["definition"] == got["definition"]

    same = admin.ok("PUT", "/flags/crud", {"updatedAt": "2025-02-01T00:00:00Z", "enabled": True})
    assert (same["status"], same["version"]) == ("unchanged", created["version"])
    older = admin.ok("PUT", "/flags/crud", {"enabled": False, "updatedAt": "2025-01-01T00:00:00Z"})
    assert (older["status"], older["ignored"]) == ("unchanged", ["crud"])
    assert served_flags(proxy, origin)["crud"] is True

    invalid = admin.call("PUT", "/flags/crud", {"enable": False})
    assert invalid.status_code == 422
    assert invalid.json()["error"] == "invalid_flags"
    assert invalid.json()["field"] == "flags.crud.enable"
    assert "flags.crud.enable" in invalid.json()["detail"]
    bad_json = admin.call("PUT", "/flags/crud", b"{nope")
    assert (bad_json.status_code, bad_json.json()["error"]) == (400, "invalid_json")
    assert admin.version() == created["version"]

    newer = admin.ok("PUT", "/flags/crud", {"enabled": False, "updatedAt": "2025-03-01T00:00:00Z"})
    assert newer["changed"] == ["crud"]
    assert served_flags(proxy, origin)["crud"] is False

    deleted = admin.ok("DELETE", "/flags/crud")
    assert (deleted["status"], deleted["changed"]) == ("applied", ["crud"])
    assert "crud" not in served_flags(proxy, origin)
    assert admin.call("GET", "/flags/crud").status_code == 404
    again = admin.call("DELETE", "/flags/crud")
    assert (again.status_code, again.json()["error"]) == (404, "unknown_flag")


def test_put_percent_encoded_key(admin: Admin, origin: RawOrigin) -> None:
    key = "ünï code.flag"
    path = "/flags/" + httpx.URL(path="/" + key).raw_path.decode()[1:]
    admin.ok("PUT", path, {"enabled": True})
    assert admin.ok("GET", path)["key"] == key
    assert served_flags(admin.proxy, origin)[key] is True
    admin.ok("DELETE", path)
    assert key not in served_flags(admin.proxy, origin)


# --- kill, promote, restore ------------------------------------------------------------------------


def test_kill_serves_everyone_the_default_until_restored(admin: Admin, origin: RawOrigin) -> None:
    proxy = admin.proxy
    admin.ok("PUT", "/flags/kill-me", TWO_WAY)
    assert served_many(proxy, origin, "kill-me") == {"a", "b"}

    killed = admin.ok("POST", "/flags/kill-me/kill")
    assert (killed["status"], killed["changed"]) == ("applied", ["kill-me"])
    assert served_many(proxy, origin, "kill-me") == {"a"}
    for user in USERS[:3]:
        assert admin.evaluate(key=user)["flags"]["kill-me"] == {"value": "a", "reason": "killed"}
    got = admin.ok("GET", "/flags/kill-me")
    assert got["override"] == {"kill": True}
    assert got["definition"] == TWO_WAY  # the definition itself is untouched

    restored = admin.ok("POST", "/flags/kill-me/restore")
    assert restored["changed"] == ["kill-me"]
    assert served_many(proxy, origin, "kill-me") == {"a", "b"}
    assert "override" not in admin.ok("GET", "/flags/kill-me")
    assert admin.evaluate(key=USERS[0])["flags"]["kill-me"]["reason"] == "split"

    nothing = admin.ok("POST", "/flags/kill-me/restore")
    assert nothing["status"] == "unchanged"
    unknown = admin.call("POST", "/flags/no-such-flag/kill")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_flag")


def test_deleting_a_flag_drops_its_kill(admin: Admin, origin: RawOrigin) -> None:
    admin.ok("PUT", "/flags/kill-then-delete", TWO_WAY)
    admin.ok("POST", "/flags/kill-then-delete/kill")
    admin.ok("DELETE", "/flags/kill-then-delete")
    admin.ok("PUT", "/flags/kill-then-delete", TWO_WAY)
    assert "override" not in admin.ok("GET", "/flags/kill-then-delete")
    assert served_many(admin.proxy, origin, "kill-then-delete") == {"a", "b"}


def test_kill_a_boolean_flag(admin: Admin, origin: RawOrigin) -> None:
    admin.ok("PUT", "/flags/kill-bool", {"percentage": 100})
    assert served_many(admin.proxy, origin, "kill-bool") == {True}
    admin.ok("POST", "/flags/kill-bool/kill")
    assert served_many(admin.proxy, origin, "kill-bool") == {False}
    admin.ok("POST", "/flags/kill-bool/restore")
    assert served_many(admin.proxy, origin, "kill-bool") == {True}


def test_promote_serves_everyone_one_variant(admin: Admin, origin: RawOrigin) -> None:
    proxy = admin.proxy
    admin.ok("PUT", "/flags/promote-me", TWO_WAY)
    promoted = admin.ok("POST", "/flags/promote-me/promote", {"variant": "b"})
    assert (promoted["status"], promoted["changed"]) == ("applied", ["promote-me"])
    assert served_many(proxy, origin, "promote-me") == {"b"}
    assert admin.evaluate(key="anyone")["flags"]["promote-me"] == {"value": "b", "reason": "promoted"}
    assert admin.ok("GET", "/flags/promote-me")["override"] == {"promote": "b"}

    version = admin.version()
    for body in ({"variant": "zz"}, {"variant": None}, {}, ["b"], {"variant": True}):
        refused = admin.call("POST", "/flags/promote-me/promote", body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["error"] == "unknown_variant"
        assert '"a"' in refused.json()["detail"] and '"b"' in refused.json()["detail"]
    assert admin.version() == version
    assert served_many(proxy, origin, "promote-me") == {"b"}

    admin.ok("POST", "/flags/promote-me/restore")
    assert served_many(proxy, origin, "promote-me") == {"a", "b"}
    unknown = admin.call("POST", "/flags/no-such-flag/promote", {"variant": "a"})
    assert unknown.status_code == 404


def test_promote_a_boolean_flag(admin: Admin, origin: RawOrigin) -> None:
    admin.ok("PUT", "/flags/promote-bool", {"percentage": 50})
    assert served_many(admin.proxy, origin, "promote-bool") == {True, False}
    admin.ok("POST", "/flags/promote-bool/promote", {"variant": "false"})  # "true"/"false" mean the booleans
    assert served_many(admin.proxy, origin, "promote-bool") == {False}
    admin.ok("POST", "/flags/promote-bool/promote", {"variant": True})
    assert served_many(admin.proxy, origin, "promote-bool") == {True}
    refused = admin.call("POST", "/flags/promote-bool/promote", {"variant": "yes"})
    assert refused.status_code == 422
    admin.ok("POST", "/flags/promote-bool/restore")
    assert served_many(admin.proxy, origin, "promote-bool") == {True, False}


# --- evaluate -------------------------------------------------------------------------------------------


def bucket(salt: str, value: str) -> int:
    return mmh3.hash(f"{salt}:{value}", 0, signed=False) % 10000


def test_evaluate_explains_every_reason(admin: Admin) -> None:
    by_rule = admin.evaluate(key="u1", **{"attr.country": "NZ"})
    assert by_rule["context"] == {"country": "NZ", "key": "u1"}
    assert by_rule["flags"]["layout"] == {
        "value": "compact",
        "reason": "rule",
        "rule": 0,
        "config": {"rows": 3},
    }
    second_rule = admin.evaluate(key="u1", **{"attr.plan": "pro"})["flags"]["layout"]
    assert second_rule == {"value": "classic", "reason": "rule", "rule": 1}

    for user in ("u1", "u2", "u3", "u4"):
        split = admin.evaluate(key=user)["flags"]["layout"]
        b = bucket("layout", user)
        assert split["reason"] == "split"
        assert split["bucket"] == b
        assert split["value"] == ("classic" if b < 5000 else "compact")

    flags = admin.evaluate(key="u1")["flags"]
    assert flags["by-team"] == {"value": "x", "reason": "default", "detail": "no 'team' to bucket by"}
    with_team = admin.evaluate(key="u1", **{"attr.team": "red"})["flags"]["by-team"]
    assert with_team == {
        "value": "x" if bucket("by-team", "red") < 5000 else "y",
        "reason": "split",
        "bucket": bucket("by-team", "red"),
    }
    assert flags["off"] == {"value": False, "reason": "disabled"}
    assert flags["shop-only"] == {"value": True, "reason": "fallthrough"}  # no path: every flag


def test_evaluate_with_a_path_lists_only_the_flags_for_that_route(admin: Admin) -> None:
    shop = admin.evaluate(key="u1", path="/shop/cart")
    assert "shop-only" in shop["flags"]
    assert shop["context"]["path"] == "/shop/cart"
    other = admin.evaluate(key="u1", path="/api/orders")
    assert "shop-only" not in other["flags"]
    assert {"layout", "by-team", "off"} <= set(other["flags"])


def test_evaluate_agrees_with_what_the_origin_receives(admin: Admin, origin: RawOrigin) -> None:
    for user in USERS[:6]:
        served = served_flags(admin.proxy, origin, user=user, path="/shop/agree")
        explained = admin.evaluate(key=user, path="/shop/agree/1")
        assert served == {k: v["value"] for k, v in explained["flags"].items()}


# --- audit ---------------------------------------------------------------------------------------------


def test_audit_is_newest_first_and_capped(admin: Admin) -> None:
    admin.ok("PUT", "/flags/audited", {"enabled": True})
    admin.ok("PUT", "/flags/audited", {"enabled": False})
    admin.ok("POST", "/flags/audited/kill")
    admin.ok("POST", "/flags/audited/restore")
    admin.ok("POST", "/flags/audited/promote", {"variant": True})
    admin.ok("POST", "/flags/audited/restore")
    final = admin.ok("DELETE", "/flags/audited")["version"]

    entries = admin.ok("GET", f"/audit?limit={AUDIT_MAX}")["entries"]
    assert len(entries) == AUDIT_MAX  # seven changes, capped at [store] audit_max
    assert [(e["flag"], e["action"], e["source"], e["actor"]) for e in entries] == [
        ("audited", "delete", "native", "admin"),
        ("audited", "restore", "overrides", "admin"),
        ("audited", "promote", "overrides", "admin"),
        ("audited", "restore", "overrides", "admin"),
        ("audited", "kill", "overrides", "admin"),
        ("audited", "upsert", "native", "admin"),
    ]
    assert [e["new_version"] for e in entries] == list(range(final, final - AUDIT_MAX, -1))
    assert all(e["old_version"] == e["new_version"] - 1 for e in entries)
    assert all(e["time"].endswith("Z") and e["time"][:2] == "20" for e in entries)
    assert set(entries[0]) == {"time", "source", "actor", "flag", "action", "old_version", "new_version"}
    assert admin.ok("GET", "/audit")["entries"] == entries  # default limit, capped the same
    assert admin.ok("GET", "/audit?limit=2")["entries"] == entries[:2]

    for limit in ("0", str(AUDIT_MAX + 1), "abc", "-1"):
        refused = admin.call("GET", f"/audit?limit={limit}")
        assert (refused.status_code, refused.json()["error"]) == (400, "bad_limit")


def test_webhook_changes_are_audited(admin: Admin) -> None:
    response = post_webhook(admin.proxy.base_url, {"upsert": {"hooked": {}}}, SECRET)
    assert response.status_code == 202, response.text
    newest = admin.ok("GET", "/audit?limit=1")["entries"][0]
    assert (newest["flag"], newest["action"], newest["actor"], newest["source"]) == (
        "hooked",
        "upsert",
        "webhook:native",
        "native",
    )
    assert newest["new_version"] == response.json()["version"]


# --- the native webhook on either store ----------------------------------------------------------------


def test_native_webhook_changes_served_flags(admin: Admin, origin: RawOrigin) -> None:
    proxy = admin.proxy
    assert "via-webhook" not in served_flags(proxy, origin)
    patch = {"upsert": {"via-webhook": {"enabled": True}, "off": {"enabled": True}}}
    response = post_webhook(proxy.base_url, patch, SECRET)
    assert response.status_code == 202, response.text
    assert sorted(response.json()["changed"]) == ["off", "via-webhook"]
    served = served_flags(proxy, origin)
    assert (served["via-webhook"], served["off"]) == (True, True)

    stale_base = response.json()["version"]
    assert post_webhook(proxy.base_url, {"delete": ["via-webhook"], "version": 50}, SECRET).status_code == 202
    stale = post_webhook(proxy.base_url, {"upsert": {"via-webhook": {}}, "version": 50}, SECRET)
    assert (stale.status_code, stale.json()["error"]) == (409, "stale")
    assert stale.json()["version"] == stale_base + 1
    assert "via-webhook" not in served_flags(proxy, origin)
    bad = post_webhook(proxy.base_url, {"upsert": {"x": {}}}, "not-the-secret")
    assert bad.status_code == 401
    restore = post_webhook(proxy.base_url, {"upsert": {"off": FLAGS["flags"]["off"]}}, SECRET)
    assert restore.status_code == 202
    assert served_flags(proxy, origin)["off"] is False


# --- flagproxy flags (the CLI) ------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [PYTHON, "-m", "proxy", "flags", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=clean_env(env or {}),
        check=False,
    )


def test_cli_against_a_running_proxy(
    admin_proxies: dict[str, ProxyProcess], origin: RawOrigin, tmp_path: Path
) -> None:
    proxy = admin_proxies["redis"]
    common = ("--url", proxy.base_url, "--token", TOKEN)

    definition = tmp_path / "cli-flag.json"
    definition.write_text(json.dumps(TWO_WAY))
    created = run_cli(*common, "set", "cli-flag", str(definition))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["changed"] == ["cli-flag"]
    assert served_many(proxy, origin, "cli-flag") == {"a", "b"}

    listed = run_cli(*common, "list")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["flags"]["cli-flag"]["definition"] == TWO_WAY

    got = run_cli("get", "cli-flag", env={"FLAGPROXY_URL": proxy.base_url, "FLAGPROXY_ADMIN_TOKEN": TOKEN})
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["definition"] == TWO_WAY

    killed = run_cli(*common, "kill", "cli-flag")
    assert (killed.returncode, json.loads(killed.stdout)["status"]) == (0, "applied")
    assert served_many(proxy, origin, "cli-flag") == {"a"}

    promoted = run_cli(*common, "promote", "cli-flag", "b")
    assert promoted.returncode == 0, promoted.stderr
    assert served_many(proxy, origin, "cli-flag") == {"b"}
    unknown_variant = run_cli(*common, "promote", "cli-flag", "zz")
    assert unknown_variant.returncode == 1
    assert json.loads(unknown_variant.stderr)["error"] == "unknown_variant"

    replaced = run_cli(*common, "set", "cli-flag", "-", stdin=json.dumps({"enabled": False}))
    assert replaced.returncode == 0, replaced.stderr
    restored = run_cli(*common, "restore", "cli-flag")
    assert restored.returncode == 0, restored.stderr
    assert served_many(proxy, origin, "cli-flag") == {False}

    deleted = run_cli(*common, "delete", "cli-flag")
    assert (deleted.returncode, json.loads(deleted.stdout)["changed"]) == (0, ["cli-flag"])
    assert "cli-flag" not in served_flags(proxy, origin)
    gone = run_cli(*common, "get", "cli-flag")
    assert gone.returncode == 1
    assert json.loads(gone.stderr)["error"] == "unknown_flag"


def test_cli_errors(admin_proxies: dict[str, ProxyProcess], tmp_path: Path) -> None:
    proxy = admin_proxies["redis"]
    denied = run_cli("--url", proxy.base_url, "--token", "wrong", "list")
    assert denied.returncode == 1
    assert denied.stdout == ""
    body = json.loads(denied.stderr)
    assert body["error"] == "unauthorized" and body["detail"]
    no_token = run_cli("--url", proxy.base_url, "kill", "layout")
    assert (no_token.returncode, json.loads(no_token.stderr)["error"]) == (1, "unauthorized")

    unreachable = run_cli("--url", f"http://127.0.0.1:{free_port()}", "--token", TOKEN, "list")
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr

    bad_file = tmp_path / "bad.json"
    bad_file.write_text("{not json")
    invalid = run_cli("--url", proxy.base_url, "--token", TOKEN, "set", "x", str(bad_file))
    assert invalid.returncode == 1
    assert "not valid JSON" in invalid.stderr
