"""Experiments end to end: real proxy processes, a real origin recording what it received, the
experiment data in SQLite (the embedded default) — exposures, goals, tracked conversions, results,
resets and promotion, through the HTTP API and the ``flagproxy`` command."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from support import (
    PYTHON,
    REPO,
    ProxyProcess,
    RawOrigin,
    clean_env,
    http_client,
    http_response,
    wait_for,
)

TOKEN = "admin-token-e2e"
TRACK = "track-token-e2e"
VARIANTS = {"control": {"weight": 50}, "treatment_a": {"weight": 25}, "treatment_b": {"weight": 25}}
FLAGS = {
    "flags": {
        "price": {
            "variants": VARIANTS,
            "defaultVariant": "control",
            "experiment": {"goals": ["trade", "purchase"], "window_hours": 1},
            "priority": -1,  # the first the header budget leaves out
        },
        "quick": {  # a window of 36 s, for conversions after it
            "percentage": 50,
            "experiment": {"goals": ["purchase"], "window_hours": 0.01},
        },
        "plain": {"variants": {"a": {"weight": 1}, "b": {"weight": 1}}},
        "wide": {  # only on /tight: crowds the experiment out of a small budget
            "variants": {"w" * 420: {"weight": 1}},  # a 420-byte value: little room is left
            "priority": 100,
            "routes": ["/tight/**"],
        },
    }
}
CONFIG = f"""
[admin]
token = "{TOKEN}"

[experiments]
track_token = "{TRACK}"
flush_interval_s = 0.05

[[goals]]
name = "trade"
method = "POST"
path = "/api/trades/**"
status = "2xx"

[[goals]]
name = "signup"
path = "/signup"
status = "201"
"""


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


class Client:
    def __init__(self, proxy: ProxyProcess, origin: RawOrigin) -> None:
        self.proxy, self.origin = proxy, origin
        self.http = http_client()

    def get(self, path: str, user: str | None, method: str = "GET") -> Any:
        headers = {"X-User-Id": user} if user is not None else {}
        return self.http.request(method, f"{self.proxy.base_url}{path}", headers=headers)

    def results(self, flag: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.proxy.base_url}/__flags/api/experiments/{flag}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def track(self, body: Any, token: str = TRACK, raw: bytes | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return self.http.post(f"{self.proxy.base_url}/__flags/api/track", headers=headers, content=content)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        return self.http.request(
            method,
            f"{self.proxy.base_url}/__flags/api{path}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json=body,
        )

    def received(self, path: str) -> dict[str, Any]:
        header = self.origin.only_request_to(path).value("X-Feature-Flags")
        return json.loads(header) if header else {}


@pytest.fixture(scope="module")
def setup(origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]) -> Client:
    origin = origin_factory()
    origin.route("/api/trades/ok", http_response(201, [("Content-Type", "text/plain")], b"made"))
    origin.route("/api/trades/fail", http_response(500, [("Content-Type", "text/plain")], b"broken"))
    origin.route("/signup", http_response(200, [("Content-Type", "text/plain")], b"not 201"))
    config = CONFIG + f'\n[[origins]]\nprefix = "/tight"\nurl = "{origin.url}"\nheader_limit_bytes = 1300\n'
    config += f'\n[[origins]]\nprefix = "/"\nurl = "{origin.url}"\n'
    proxy = proxy_factory(config=config, flags=FLAGS)
    return Client(proxy, origin)


def variant_rows(results: dict[str, Any], goal: str) -> dict[Any, dict[str, Any]]:
    return {row["variant"]: row for row in results["goals"][goal]["variants"]}


def test_users_per_variant_are_exactly_what_the_origin_received(setup: Client) -> None:
    seen: dict[str, str] = {}
    for i in range(240):
        user = f"count-{i}"
        path = f"/shop/count/{i}"
        assert setup.get(path, user).status_code == 200
        seen[user] = setup.received(path)["price"]
    for i in range(0, 240, 3):  # returning users change nothing
        assert setup.get(f"/shop/again/{i}", f"count-{i}").status_code == 200
    expected = Counter(seen.values())
    results = setup.results("price")
    rows = variant_rows(results, "trade")
    assert [row["variant"] for row in results["goals"]["trade"]["variants"]] == [
        "control",
        "treatment_a",
        "treatment_b",
    ]
    got = {variant: rows[variant]["users"] for variant in ("control", "treatment_a", "treatment_b")}
    assert got == {v: expected.get(v, 0) for v in got}
    assert results["users"] >= 240
    assert results["control"] == "control" and results["window_hours"] == 1
    assert results["srm"]["expected"] == {"control": 0.5, "treatment_a": 0.25, "treatment_b": 0.25}
    assert set(results["srm"]["observed"]) == {"control", "treatment_a", "treatment_b"}


def test_goals_match_method_path_and_status(setup: Client) -> None:
    before = setup.results("price")
    user = "goal-user"
    assert setup.get("/shop/goal", user).status_code == 200
    variant = setup.received("/shop/goal")["price"]
    assert setup.get("/api/trades/fail", user, "POST").status_code == 500  # a 500 is no conversion
    assert setup.get("/api/trades/ok", user, "GET").status_code == 201  # not the goal's method
    assert setup.get("/api/other", user, "POST").status_code == 200  # not its path
    assert setup.get("/signup", user, "POST").status_code == 200  # "201" exactly
    mid = setup.results("price")
    assert (
        variant_rows(mid, "trade")[variant]["conversions"]
        == variant_rows(before, "trade")[variant]["conversions"]
    )
    assert setup.get("/api/trades/ok", user, "POST").status_code == 201
    assert setup.get("/api/trades/ok", user, "POST").status_code == 201  # once per unit and goal
    after = setup.results("price")
    assert (
        variant_rows(after, "trade")[variant]["conversions"]
        == variant_rows(before, "trade")[variant]["conversions"] + 1
    )


def test_first_exposure_wins_and_another_variant_counts_as_multiple(setup: Client) -> None:
    # "sticky" lands in some variant; then the flag is changed so that everyone gets treatment_b
    assert setup.get("/shop/sticky", "sticky").status_code == 200
    first = setup.received("/shop/sticky")["price"]
    before = setup.results("price")
    moved = {
        **FLAGS["flags"]["price"],
        "variants": {**VARIANTS, "control": {"weight": 0}, "treatment_a": {"weight": 0}},
    }
    assert setup.admin("PUT", "/flags/price", moved).status_code == 200
    try:
        forced = "treatment_b"
        if first == forced:  # already there: move everyone to control instead
            forced = "control"
            moved["variants"] = {**VARIANTS, "treatment_a": {"weight": 0}, "treatment_b": {"weight": 0}}
            assert setup.admin("PUT", "/flags/price", moved).status_code == 200
        assert setup.get("/shop/sticky-2", "sticky").status_code == 200
        assert setup.received("/shop/sticky-2")["price"] == forced
        after = setup.results("price")
    finally:
        assert setup.admin("PUT", "/flags/price", FLAGS["flags"]["price"]).status_code == 200
    assert after["multiple_exposures"] == before["multiple_exposures"] + 1
    rows_before, rows_after = variant_rows(before, "trade"), variant_rows(after, "trade")
    assert rows_after[first]["users"] == rows_before[first]["users"]  # still counted in its first
    assert rows_after[forced]["users"] == rows_before[forced]["users"]


def test_conversions_count_only_from_the_first_exposure_and_within_the_window(setup: Client) -> None:
    now = time.time()
    assert setup.get("/shop/window", "window-user").status_code == 200
    variant = setup.received("/shop/window")["quick"]  # a boolean flag: true or false
    before = setup.results("quick")
    early = {"key": "window-user", "event": "purchase", "timestamp": iso(now - 3600)}
    late = {"key": "window-user", "event": "purchase", "timestamp": iso(now + 120)}  # window: 36 s
    never = {"key": "never-exposed-user", "event": "purchase"}
    for body in (early, late, never):
        assert setup.track(body).status_code == 200

    def never_settled() -> dict[str, Any] | None:  # asked again, final, 2 s later: then unattributed
        results = setup.results("quick")
        return results if results["unattributed"] > before["unattributed"] else None

    mid = wait_for(never_settled, timeout=10, interval=0.1, what="the never-exposed conversion settled")
    assert (
        variant_rows(mid, "purchase")[variant]["conversions"]
        == variant_rows(before, "purchase")[variant]["conversions"]
    )
    assert mid["unattributed"] == before["unattributed"] + 1
    ok = {"key": "window-user", "event": "purchase", "value": 4.5}
    response = setup.track({"events": [ok, ok]})
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 2
    after = setup.results("quick")
    row = variant_rows(after, "purchase")[variant]
    assert row["conversions"] == variant_rows(before, "purchase")[variant]["conversions"] + 1
    assert row["value"] == pytest.approx(variant_rows(before, "purchase")[variant]["value"] + 4.5)


def test_a_flag_the_budget_left_out_is_not_an_exposure(setup: Client) -> None:
    before = setup.results("price")
    for i in range(20):
        assert setup.get(f"/tight/crowded/{i}", f"crowded-{i}").status_code == 200
        request = setup.origin.only_request_to(f"/tight/crowded/{i}")
        sent = json.loads(request.value("X-Feature-Flags") or "{}")
        assert "price" not in sent and "w" * 420 in sent.values()
        assert int(request.value("X-Feature-Flags-Omitted") or 0) >= 1
        named = request.value("X-Feature-Flags-Omitted-Keys")
        assert named is None or "price" in json.loads(named)
    assert setup.results("price")["users"] == before["users"]


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_body", ""),
        (b'{"event": "trade"}', 422, "invalid_event", "key"),
        (b'{"key": "u", "event": ""}', 422, "invalid_event", "event"),
        (b'{"key": "u", "event": "trade", "value": "12"}', 422, "invalid_event", "value"),
        (b'{"key": "u", "event": "trade", "value": true}', 422, "invalid_event", "value"),
        (b'{"key": "u", "event": "trade", "timestamp": "yesterday"}', 422, "invalid_event", "timestamp"),
        (
            b'{"key": "u", "event": "trade", "timestamp": "2026-01-01T00:00:00"}',
            422,
            "invalid_event",
            "timestamp",
        ),
        (
            b'{"key": "u", "event": "trade", "timestamp": "2999-01-01T00:00:00Z"}',
            422,
            "invalid_event",
            "timestamp",
        ),
        (b'{"key": "u", "event": "trade", "extra": 1}', 422, "invalid_event", "extra"),
        (b'{"key": "u\\n", "event": "trade"}', 422, "invalid_event", "key"),
        (b'{"events": []}', 422, "invalid_event", "events"),
        (
            b'{"events": [{"key": "u", "event": "trade"}, {"key": 7, "event": "trade"}]}',
            422,
            "invalid_event",
            "events[1].key",
        ),
        (
            json.dumps({"events": [{"key": "u", "event": "trade"}] * 1001}).encode(),
            413,
            "too_many_events",
            "events",
        ),
        (b'{"key": "' + b"k" * 2_000_000 + b'", "event": "trade"}', 413, "payload_too_large", None),
    ],
)
def test_bad_track_bodies_are_refused_and_record_nothing(
    setup: Client, body: bytes, status: int, error: str, field: str | None
) -> None:
    before = [setup.results(flag) for flag in ("price", "quick")]
    response = setup.track(None, raw=body)
    assert response.status_code == status, response.text
    problem = response.json()
    assert problem["error"] == error and problem["detail"]
    if field is not None:
        assert problem.get("field") == field
    assert [setup.results(flag) for flag in ("price", "quick")] == before


def test_track_needs_its_token(setup: Client) -> None:
    body = {"key": "token-user", "event": "trade"}
    assert setup.track(body, token="").status_code == 401
    assert setup.track(body, token="wrong").status_code == 401
    assert setup.track(body, token=TOKEN).status_code == 200  # the admin token works too
    assert setup.track(body, token=TRACK).status_code == 200
    results_without = setup.http.get(f"{setup.proxy.base_url}/__flags/api/experiments/price")
    assert results_without.status_code == 401


def test_list_unknown_and_reset(setup: Client) -> None:
    listed = setup.admin("GET", "/experiments").json()["experiments"]
    assert {e["flag"] for e in listed} >= {"price", "quick"}
    price = next(e for e in listed if e["flag"] == "price")
    assert price["variants"] == ["control", "treatment_a", "treatment_b"] and price["status"] == "running"
    assert price["started_at"].endswith("Z")
    assert setup.admin("GET", "/experiments/plain").status_code == 404
    assert setup.admin("GET", "/experiments/nope").json()["error"] == "unknown_experiment"

    assert setup.get("/shop/reset", "reset-user").status_code == 200
    assert setup.results("quick")["users"] > 0
    response = setup.admin("POST", "/experiments/quick/reset")
    assert response.status_code == 200, response.text
    assert response.json()["reset"] is True
    emptied = setup.results("quick")
    assert emptied["users"] == 0 and emptied["started_at"] is None
    audit = setup.admin("GET", "/audit").json()["entries"]
    assert any(e.get("flag") == "quick" and e.get("action") == "reset" for e in audit)
    assert setup.results("price")["users"] > 0  # the other experiment is untouched
    # a unit seen before the reset is exposed again (the in-process memory of repeats is dropped)
    assert setup.get("/shop/reset-2", "reset-user").status_code == 200
    assert setup.results("quick")["users"] == 1


def test_the_results_command_and_promoting_the_winner(setup: Client) -> None:
    env = clean_env({"FLAGPROXY_ADMIN_TOKEN": TOKEN})
    url = setup.proxy.base_url

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "proxy", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )

    table = cli("experiments", "results", "price", "--goal", "trade", "--url", url)
    assert table.returncode == 0, table.stderr
    assert "treatment_a" in table.stdout and "SRM" in table.stdout
    as_json = cli("experiments", "results", "price", "--json", "--url", url)
    assert json.loads(as_json.stdout)["flag"] == "price"

    promoted = cli("flags", "--url", url, "promote", "price", "treatment_b")
    assert promoted.returncode == 0, promoted.stderr
    try:
        before = setup.results("price")
        assert before["status"] == "promoted"
        assert setup.get("/shop/after-promotion", "after-promotion").status_code == 200
        assert setup.received("/shop/after-promotion")["price"] == "treatment_b"
        assert setup.results("price")["users"] == before["users"]  # the experiment is over
    finally:
        assert cli("flags", "--url", url, "restore", "price").returncode == 0
