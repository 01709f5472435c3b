"""The engine behind the real proxy: targeting from request attributes, per-route selection,
sticky anonymous ids, and `flagproxy eval` printing exactly what X-Feature-Flags carries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import REPO

FLAGS = {
    "flags": {
        "checkout-layout": {
            "variants": {"classic": {"weight": 50}, "compact": {"weight": 50, "config": {"rows": 3}}},
            "defaultVariant": "classic",
            "rules": [
                {"if": {"==": [{"var": "country"}, "NZ"]}, "variant": "compact"},
                {"if": {"sem_ver": [{"var": "version"}, "<", "2.0.0"]}, "variant": "classic"},
            ],
        },
        "shop-banner": {"routes": ["/shop/**"], "percentage": 50},
        "price-test": {
            "variants": {"a": {"weight": 1, "config": "$2.99"}, "b": {"weight": 1, "config": "$1.99"}},
            "routes": ["/shop/*/price", "/api/**"],
        },
        "GLOBAL_KILL": {"enabled": False},
        "is-admin": {
            "percentage": 0,
            "rules": [{"if": {"in": [{"var": "role"}, ["admin", "owner"]]}, "value": True}],
        },
    }
}
CONFIG = """
[context]
header_attributes = ["X-Country=country", "X-App-Version=version"]
query_attributes = ["role"]
"""


@pytest.fixture(scope="module")
def proxy(proxy_factory, origin):
    return proxy_factory([origin.url], flags=FLAGS, config=CONFIG)


def flags_seen(origin, path: str) -> tuple[dict, dict | None]:
    seen = origin.requests_to(path)[-1]
    config = seen.value("X-Feature-Flags-Config")
    return json.loads(seen.value("X-Feature-Flags")), (json.loads(config) if config else None)


def run_eval(flags_path: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "eval", "--flags", str(flags_path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_targeting_uses_header_attributes(proxy, origin) -> None:
    httpx.get(f"{proxy.base_url}/shop/1/price", headers={"X-User-Id": "u1", "X-Country": "NZ"})
    values, configs = flags_seen(origin, "/shop/1/price")
    assert values["checkout-layout"] == "compact"
    assert configs is not None and configs["checkout-layout"] == {"rows": 3}
    httpx.get(f"{proxy.base_url}/shop/2/price", headers={"X-User-Id": "u1", "X-App-Version": "1.9.9"})
    values, _ = flags_seen(origin, "/shop/2/price")
    assert values["checkout-layout"] == "classic"


def test_query_attribute_targets_boolean_rule(proxy, origin) -> None:
    httpx.get(f"{proxy.base_url}/api/a?role=owner", headers={"X-User-Id": "u2"})
    assert flags_seen(origin, "/api/a")[0]["is-admin"] is True
    httpx.get(f"{proxy.base_url}/api/b?role=guest", headers={"X-User-Id": "u2"})
    assert flags_seen(origin, "/api/b")[0]["is-admin"] is False


def test_only_flags_whose_routes_match_are_forwarded(proxy, origin) -> None:
    httpx.get(f"{proxy.base_url}/shop/x/y", headers={"X-User-Id": "u3"})
    assert set(flags_seen(origin, "/shop/x/y")[0]) == {
        "checkout-layout",
        "shop-banner",
        "GLOBAL_KILL",
        "is-admin",
    }
    httpx.get(f"{proxy.base_url}/api/v1/orders", headers={"X-User-Id": "u3"})
    assert set(flags_seen(origin, "/api/v1/orders")[0]) == {
        "checkout-layout",
        "price-test",
        "GLOBAL_KILL",
        "is-admin",
    }
    httpx.get(f"{proxy.base_url}/other", headers={"X-User-Id": "u3"})
    assert "shop-banner" not in flags_seen(origin, "/other")[0]


def test_anonymous_caller_keeps_variants_via_sticky_cookie(proxy, origin, tmp_path) -> None:
    first = httpx.get(f"{proxy.base_url}/shop/anon/price")
    cookie = first.headers.get("set-cookie")
    assert cookie and cookie.startswith("flag_uid=") and "HttpOnly" in cookie
    uid = cookie.split(";")[0].split("=", 1)[1]
    first_values, _ = flags_seen(origin, "/shop/anon/price")
    again = httpx.get(f"{proxy.base_url}/shop/anon/price", headers={"Cookie": f"flag_uid={uid}"})
    assert "set-cookie" not in again.headers
    assert flags_seen(origin, "/shop/anon/price")[0] == first_values
    flags_path = tmp_path / "flags.json"
    flags_path.write_text(json.dumps(FLAGS))
    printed = json.loads(run_eval(flags_path, "--key", uid, "--attr", "path=/shop/anon/price"))
    assert printed == first_values


def test_eval_batch_prints_exactly_what_the_header_carries(proxy, origin, tmp_path) -> None:
    flags_path = tmp_path / "flags.json"
    flags_path.write_text(json.dumps(FLAGS))
    lines = []
    expected = []
    for i in range(40):
        country = ["NZ", "US", "FR"][i % 3]
        path = f"/api/batch{i}"
        httpx.get(f"{proxy.base_url}{path}", headers={"X-User-Id": f"user-{i}", "X-Country": country})
        expected.append(flags_seen(origin, path)[0])
        lines.append(json.dumps({"key": f"user-{i}", "attributes": {"country": country, "path": path}}))
    out = run_eval(flags_path, "--keys-file", "-", stdin="\n".join(lines) + "\n").splitlines()
    assert len(out) == 40
    for i, line in enumerate(out):
        row = json.loads(line)
        assert row["key"] == f"user-{i}"
        assert row["flags"] == expected[i]


def test_eval_reports_invalid_flags_with_field(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"flags": {"x": {"variants": {"a": {"weight": 1}}, "rules": [{"if": True, "variant": "zz"}]}}}
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "eval", "--flags", str(bad), "--key", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "flags.x.rules[0].variant" in result.stderr
