"""The web console (``/__flags/console/``) in process: sign-in, the session cookie, CSRF and the
same-origin check, escaping, and writes that go through the admin API's functions (store, audit).

The same pages in a real browser: tests/test_console_browser.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis  # noqa: F401  (see below)
import pytest

from proxy.app import FlagProxy
from proxy.config import ConfigError, load_settings
from proxy.control.console import session

# Hypothesis's pytest plugin imports hypothesis at the end of a session that has not; by then a
# FlagProxy here has frozen the heap (gc.freeze after a store change), and hypothesis's import-time
# check of trio's random generator (gc.get_referrers) fails with a HypothesisWarning, an error under
# this suite's filterwarnings. Imported first, it runs its check before any freeze.
pytestmark = pytest.mark.anyio

TOKEN = "console-admin-token-4f9d"
EVIL = "<script>alert('key')</script>"
EVIL_CONFIG = "</script><script>alert('config')</script>"
FLAGS = {
    "flags": {
        "checkout": {
            "variants": {"classic": {"weight": 50}, "express": {"weight": 50, "config": {"steps": 1}}},
            "defaultVariant": "classic",
            "rules": [{"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "express"}],
            "routes": ["/shop/**"],
            "priority": 7,
        },
        "dark-mode": {"percentage": 30, "updatedAt": "2025-01-01T00:00:00.000Z"},
        EVIL: {
            "variants": {"<b>bold</b>": {"weight": 1, "config": {"html": EVIL_CONFIG}}},
            "defaultVariant": "<b>bold</b>",
            "note": "<img src=x onerror=alert(1)>",
        },
    }
}


def proxy_app(
    tmp_path: Path, env: dict[str, str] | None = None, config: str = "", document: Any = FLAGS
) -> FlagProxy:
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(document))
    path = tmp_path / "c.toml"
    path.write_text(config)
    settings = load_settings(
        config_file=path,
        env={"FLAGPROXY_ADMIN_TOKEN": TOKEN, "FLAGPROXY_EXPERIMENTS_ENABLED": "false", **(env or {})},
        origins=["http://127.0.0.1:9"],
        overrides={"store": {"flags_file": str(flags)}},
    )
    return FlagProxy(settings)


def client_of(app: FlagProxy) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app.control), base_url="http://proxy")


@pytest.fixture
def app(tmp_path: Path) -> FlagProxy:
    return proxy_app(tmp_path)


@pytest.fixture
async def client(app: FlagProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app) as c:
        yield c


async def sign_in(client: httpx.AsyncClient, token: str = TOKEN) -> str:
    """Signs in; the CSRF token the flags page carries."""
    response = await client.post("/__flags/console/login", data={"token": token})
    assert response.status_code == 303, response.text
    page = await client.get("/__flags/console/")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


def alerts(html: str) -> list[str]:
    return re.findall(r'role="alert">([^<]*)<', html)


def override_of(app: FlagProxy, key: str) -> str | None:
    return app.store.snapshot.raw.items("overrides").get(key)


def stored(app: FlagProxy, key: str) -> Any:
    return json.loads(app.store.snapshot.raw.items("native")[key])


# --- off without an admin token -------------------------------------------------------------------------


async def test_without_an_admin_token_the_console_is_a_404_naming_the_setting(tmp_path: Path) -> None:
    app = proxy_app(tmp_path, env={"FLAGPROXY_ADMIN_TOKEN": ""})
    async with client_of(app) as client:
        for method, path in [("GET", "/"), ("POST", "/login"), ("GET", "/experiments/x"), ("GET", "/events")]:
            response = await client.request(method, f"/__flags/console{path}", data={"token": ""})
            assert response.status_code == 404, (path, response.text)
            assert "[admin] token" in response.json()["detail"], response.text
        index = (await client.get("/__flags/")).json()["endpoints"]
        console = next(e for e in index if e["path"] == "/__flags/console/")
        assert console["enabled"] is False and "[admin] token" in console["enable_with"]


async def test_the_index_lists_the_console_when_on(client: httpx.AsyncClient) -> None:
    index = (await client.get("/__flags/")).json()["endpoints"]
    console = next(e for e in index if e["path"] == "/__flags/console/")
    assert console["enabled"] is True
    assert TOKEN not in json.dumps(index)


# --- sign-in and the session ----------------------------------------------------------------------------


async def test_every_page_asks_for_the_token_first(client: httpx.AsyncClient) -> None:
    for path in ["/", "/flags/checkout", "/experiments", "/budget", "/audit", "/evaluate"]:
        response = await client.get(f"/__flags/console{path}")
        assert response.status_code == 401, path
        assert 'action="/__flags/console/login"' in response.text and 'name="token"' in response.text
        assert 'data-flag="checkout"' not in response.text
    stream = await client.get("/__flags/console/events")
    assert stream.status_code == 401


async def test_a_wrong_token_is_refused_and_sets_no_cookie(app: FlagProxy, client: httpx.AsyncClient) -> None:
    response = await client.post("/__flags/console/login", data={"token": TOKEN + "x"})
    assert response.status_code == 401
    assert alerts(response.text) == ["That is not the admin token."]
    assert "set-cookie" not in response.headers
    assert (await client.get("/__flags/console/")).status_code == 401


async def test_the_session_cookie_is_signed_httponly_and_samesite_strict(client: httpx.AsyncClient) -> None:
    response = await client.post("/__flags/console/login", data={"token": TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/__flags/console/"
    cookie = response.headers["set-cookie"]
    for part in ("HttpOnly", "SameSite=Strict", "Path=/__flags/console", "Max-Age=28800"):
        assert part in cookie, cookie
    assert TOKEN not in cookie
    assert (await client.get("/__flags/console/")).status_code == 200


async def test_a_forged_expired_or_foreign_cookie_is_refused(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    settings = app.settings
    value, _ = session.issue(settings)
    assert session.verify(settings, value) is not None
    version, expires, csrf, signature = value.split(".")
    forged = [
        f"{version}.{int(expires) + 3600}.{csrf}.{signature}",  # a longer life, same signature
        f"{version}.{expires}.{csrf}x.{signature}",
        value[:-1] + ("0" if value[-1] != "0" else "1"),
        "v1.9999999999.abc",
    ]
    for bad in forged:
        assert session.verify(settings, bad) is None, bad
    expired, _ = session.issue(settings, now=1000.0)
    assert session.verify(settings, expired) is None
    other = load_settings(env={"FLAGPROXY_ADMIN_TOKEN": "another-admin-token"})
    assert session.verify(other, value) is None  # a new admin token ends every session
    for bad in [*forged, expired]:
        client.cookies.set(session.COOKIE, bad)
        assert (await client.get("/__flags/console/")).status_code == 401


async def test_a_configured_session_secret_is_used_and_checked(tmp_path: Path) -> None:
    secret = "s" * 32
    one = load_settings(env={"FLAGPROXY_ADMIN_TOKEN": TOKEN, "FLAGPROXY_CONSOLE_SESSION_SECRET": secret})
    two = load_settings(env={"FLAGPROXY_ADMIN_TOKEN": TOKEN, "FLAGPROXY_CONSOLE_SESSION_SECRET": "t" * 32})
    value, _ = session.issue(one)
    assert session.verify(one, value) is not None
    assert session.verify(two, value) is None
    derived = load_settings(env={"FLAGPROXY_ADMIN_TOKEN": TOKEN})
    assert session.verify(derived, value) is None
    with pytest.raises(ConfigError, match=r"\[console\] session_secret"):
        load_settings(env={"FLAGPROXY_CONSOLE_SESSION_SECRET": "short"})


async def test_logout_clears_the_cookie(client: httpx.AsyncClient) -> None:
    csrf = await sign_in(client)
    response = await client.post("/__flags/console/logout", data={"csrf": csrf})
    assert response.status_code == 303
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert (await client.get("/__flags/console/")).status_code == 401


async def test_sign_in_from_another_site_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/__flags/console/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403
    assert "another origin" in response.json()["detail"]
    assert "set-cookie" not in response.headers


# --- CSRF -----------------------------------------------------------------------------------------------


async def test_writes_without_the_csrf_token_or_from_another_site_change_nothing(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    csrf = await sign_in(client)
    version = app.store.snapshot.version
    cases: list[tuple[dict[str, str], dict[str, str], str]] = [
        ({"action": "kill"}, {}, "csrf"),
        ({"action": "kill", "csrf": csrf + "x"}, {}, "csrf"),
        ({"action": "kill", "csrf": ""}, {}, "csrf"),
        ({"action": "kill", "csrf": csrf}, {"Origin": "http://evil.example"}, "cross_site"),
        ({"action": "kill", "csrf": csrf}, {"Origin": "null"}, "cross_site"),
        ({"action": "kill", "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}, "cross_site"),
        ({"action": "kill", "csrf": csrf}, {"Sec-Fetch-Site": "same-site"}, "cross_site"),
    ]
    for form, headers, error in cases:
        response = await client.post("/__flags/console/flags/checkout", data=form, headers=headers)
        assert response.status_code == 403, (form, headers, response.text)
        assert response.json()["error"] == error
    assert app.store.snapshot.version == version
    assert override_of(app, "checkout") is None
    # the same write, same-origin with the token, is applied
    response = await client.post(
        "/__flags/console/flags/checkout",
        data={"action": "kill", "csrf": csrf},
        headers={"Origin": "http://proxy", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 303, response.text
    assert json.loads(override_of(app, "checkout") or "null") == {"kill": True}


async def test_the_csrf_header_works_for_scripts(app: FlagProxy, client: httpx.AsyncClient) -> None:
    csrf = await sign_in(client)
    refused = await client.post(
        "/__flags/console/flags/checkout", data={"action": "kill"}, headers={"X-CSRF-Token": "nope"}
    )
    assert refused.status_code == 403
    accepted = await client.post(
        "/__flags/console/flags/checkout", data={"action": "kill"}, headers={"X-CSRF-Token": csrf}
    )
    assert accepted.status_code == 303
    assert override_of(app, "checkout") is not None


# --- escaping -------------------------------------------------------------------------------------------


async def test_a_key_config_or_note_holding_markup_renders_inert(client: httpx.AsyncClient) -> None:
    csrf = await sign_in(client)
    from urllib.parse import quote

    killed = await client.post(
        f"/__flags/console/flags/{quote(EVIL, safe='')}", data={"action": "kill", "csrf": csrf}
    )
    assert killed.status_code == 303  # so that the audit log names the flag too
    pages = [
        "/__flags/console/",
        f"/__flags/console/flags/{quote(EVIL, safe='')}",
        "/__flags/console/budget",
        "/__flags/console/evaluate?key=u&attributes=",
        "/__flags/console/audit",
    ]
    for path in pages:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        html = response.text
        assert "<script>alert" not in html, path
        assert "<b>bold</b>" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(" in html or "&lt;b&gt;bold" in html, path
        # the only scripts are the console's own file
        assert re.findall(r"<script[^>]*>", html) == [
            '<script src="/__flags/console/static/console.js" defer>'
        ], path
        assert "script-src 'self'" in response.headers["content-security-policy"]
    flags = await client.get("/__flags/console/")
    assert 'data-flag="&lt;script&gt;alert(&#39;key&#39;)&lt;/script&gt;"' in flags.text


# --- the flags view and its writes ----------------------------------------------------------------------


async def test_the_flags_view_shows_state_shares_rules_routes_priority(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    html = (await client.get("/__flags/console/")).text
    row = re.search(r'<tr data-flag="checkout".*?</tr>', html, re.S)
    assert row is not None
    text = row.group(0)
    assert "native" in text and 'data-state="enabled"' in text
    assert "<code>classic</code> 50 %" in text and "<code>express</code> 50 %" in text
    assert "<td>1</td>" in text  # one rule
    assert "<code>/shop/**</code>" in text and "<td>7</td>" in text
    assert 'data-action="kill"' in text and 'data-action="promote"' in text
    dark = re.search(r'<tr data-flag="dark-mode".*?</tr>', html, re.S)
    assert dark is not None and "<code>true</code> 30 %" in dark.group(0)
    searched = (await client.get("/__flags/console/?q=dark")).text
    assert 'data-flag="dark-mode"' in searched and 'data-flag="checkout"' not in searched
    by_source = (await client.get("/__flags/console/?source=split")).text
    assert "data-flag=" not in by_source


async def test_kill_promote_restore_go_through_the_store_and_audit(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    csrf = await sign_in(client)
    url = "/__flags/console/flags/checkout"
    assert (await client.post(url, data={"action": "kill", "csrf": csrf})).status_code == 303
    html = (await client.get("/__flags/console/")).text
    assert re.search(r'data-flag="checkout"[^>]*data-state="killed"', html)
    assert 'data-action="restore"' in html
    assert "kill by console" in html  # the last change, from the audit
    promoted = await client.post(url, data={"action": "promote", "variant": "express", "csrf": csrf})
    assert promoted.status_code == 303
    assert json.loads(override_of(app, "checkout") or "null") == {"promote": "express"}
    bad = await client.post(url, data={"action": "promote", "variant": "nope", "csrf": csrf})
    assert bad.status_code == 422 and "classic" in bad.json()["detail"]
    assert json.loads(override_of(app, "checkout") or "null") == {"promote": "express"}
    assert (await client.post(url, data={"action": "restore", "csrf": csrf})).status_code == 303
    assert override_of(app, "checkout") is None
    audit = await app.store.audit(10)
    assert [(e["action"], e["actor"]) for e in audit if e["flag"] == "checkout"] == [
        ("restore", "console"),
        ("promote", "console"),
        ("kill", "console"),
    ]
    unknown = await client.post("/__flags/console/flags/nope", data={"action": "kill", "csrf": csrf})
    assert unknown.status_code == 404
    odd = await client.post(url, data={"action": "explode", "csrf": csrf})
    assert odd.status_code == 400


async def test_a_weights_edit_refused_by_the_engine_shows_why_and_changes_nothing(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    csrf = await sign_in(client)
    url = "/__flags/console/flags/checkout"
    before = stored(app, "checkout")
    form = {"csrf": csrf, "action": "save", "what": "weights"}
    not_number = await client.post(url, data={**form, "weight.classic": "lots", "weight.express": "1"})
    assert not_number.status_code == 422
    assert alerts(not_number.text) == ["the weight of &#39;classic&#39; must be a number, got &#39;lots&#39;"]
    assert 'value="lots"' in not_number.text  # what was typed stays in the field
    negative = await client.post(url, data={**form, "weight.classic": "-5", "weight.express": "1"})
    assert negative.status_code == 422
    [message] = alerts(negative.text)
    assert "variants.classic.weight" in message and "&gt;= 0" in message
    assert 'aria-describedby="w-1-error"' in negative.text  # next to the classic field
    assert stored(app, "checkout") == before
    ok = await client.post(url, data={**form, "weight.classic": "20", "weight.express": "80"})
    assert ok.status_code == 303, ok.text
    after = stored(app, "checkout")
    assert after["variants"]["classic"]["weight"] == 20 and after["variants"]["express"] == {
        "weight": 80,
        "config": {"steps": 1},
    }
    assert after["rules"] == before["rules"] and after["routes"] == ["/shop/**"]
    assert (await app.store.audit(1))[0]["actor"] == "console"


async def test_a_percentage_edit_of_a_flag_with_updated_at_applies_now(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    csrf = await sign_in(client)
    url = "/__flags/console/flags/dark-mode"
    form = {"csrf": csrf, "action": "save", "what": "weights"}
    over = await client.post(url, data={**form, "percentage": "150"})
    assert over.status_code == 422 and "from 0 to 100" in alerts(over.text)[0]
    ok = await client.post(url, data={**form, "percentage": "55.5"})
    assert ok.status_code == 303, ok.text
    assert stored(app, "dark-mode") == {"percentage": 55.5}


async def test_a_definition_edit_is_validated_by_the_engine(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    csrf = await sign_in(client)
    url = "/__flags/console/flags/checkout"
    before = stored(app, "checkout")
    form = {"csrf": csrf, "action": "save", "what": "definition"}
    broken = await client.post(url, data={**form, "definition": "{not json"})
    assert broken.status_code == 422 and alerts(broken.text)[0].startswith("not valid JSON")
    assert "{not json</textarea>" in broken.text
    typo = await client.post(url, data={**form, "definition": json.dumps({"percentag": 5})})
    assert typo.status_code == 422
    assert "percentag" in alerts(typo.text)[0]
    assert 'aria-describedby="definition-error"' in typo.text
    assert stored(app, "checkout") == before
    ok = await client.post(url, data={**form, "definition": json.dumps({"percentage": 10})})
    assert ok.status_code == 303
    assert stored(app, "checkout") == {"percentage": 10}


async def test_the_other_views_render(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    budget = (await client.get("/__flags/console/budget")).text
    assert 'data-route="*"' in budget and "<svg" in budget and "alert-mark" in budget
    evaluated = await client.get("/__flags/console/evaluate?key=u1&path=/shop/cart&attributes=plan%3Dpro")
    assert evaluated.status_code == 200
    row = re.search(r'<tr data-flag="checkout">.*?</tr>', evaluated.text, re.S)
    assert row is not None and "&#34;express&#34;" in row.group(0)  # the rule on plan=pro
    bad = await client.get("/__flags/console/evaluate?key=u1&attributes=justtext")
    assert bad.status_code == 400 and "name=value" in alerts(bad.text)[0]
    audit = await client.get("/__flags/console/audit?actor=console")
    assert audit.status_code == 200 and "No entries." in audit.text
    experiments = await client.get("/__flags/console/experiments")
    assert experiments.status_code == 200 and "experiments are disabled" in experiments.text
    static = await client.get("/__flags/console/static/console.js")
    assert static.status_code == 200 and "pagehide" in static.text
    assert (await client.get("/__flags/console/static/nope.js")).status_code == 404


# --- experiments ---------------------------------------------------------------------------------------


EXPERIMENT = {
    "variants": {"control": {"weight": 50}, "bold": {"weight": 50}},
    "defaultVariant": "control",
    "experiment": {"control": "control", "goals": ["signup"]},
}


def record(app: FlagProxy, users: dict[str, int], converted: dict[str, int]) -> None:
    """Exposures and signups written straight into the experiment store (as the recorder would)."""
    from proxy.experiments.records import ConversionRecord, ExposureRecord

    assert app.recorder is not None
    exposures, conversions = [], []
    for variant, n in users.items():
        for i in range(n):
            unit = f"{variant}-{i}"
            exposures.append(ExposureRecord("hero", unit, variant, 1000.0))
            if i < converted[variant]:
                conversions.append(ConversionRecord("hero", "signup", unit, 1001.0, 86400.0))
    app.recorder.backend.apply(exposures, conversions)


def experiment_app(tmp_path: Path) -> FlagProxy:
    env = {
        "FLAGPROXY_EXPERIMENTS_ENABLED": "true",
        "FLAGPROXY_EXPERIMENTS_PATH": str(tmp_path / "experiments.sqlite3"),
    }
    return proxy_app(tmp_path, env=env, document={"flags": {**FLAGS["flags"], "hero": EXPERIMENT}})


async def test_the_results_table_chart_and_promote_winner(tmp_path: Path) -> None:
    app = experiment_app(tmp_path)
    record(app, {"control": 1000, "bold": 1000}, {"control": 100, "bold": 150})
    async with client_of(app) as client:
        csrf = await sign_in(client)
        listed = (await client.get("/__flags/console/experiments")).text
        assert re.search(r'<tr data-flag="hero">.*?<td>2000</td>', listed, re.S), listed
        page = await client.get("/__flags/console/experiments/hero")
        assert page.status_code == 200
        html = page.text
        bold = re.search(r'<tr data-variant="bold">(.*?)</tr>', html, re.S)
        assert bold is not None
        cells = re.findall(r"<td>(.*?)</td>", bold.group(1), re.S)
        assert cells[:3] == ["1000", "150", "15.0 %"]
        assert cells[3].startswith("50.0 % (")  # uplift with its interval
        assert float(cells[4]) < 0.01 and cells[5].endswith("%")
        assert 'class="tag">winner' in bold.group(1)
        assert "Sample ratio mismatch" not in html
        assert html.count('class="bar"') == 2 and html.count('class="ci"') == 6  # a bar and 3 lines each
        assert 'name="variant" value="bold"' in html
        promoted = await client.post(
            "/__flags/console/flags/hero",
            data={"csrf": csrf, "action": "promote", "variant": "bold", "back": "experiment"},
        )
        assert promoted.status_code == 303
        assert promoted.headers["location"] == "/__flags/console/experiments/hero"
        assert json.loads(override_of(app, "hero") or "null") == {"promote": "bold"}
        assert [e["actor"] for e in await app.store.audit(1)] == ["console"]
        after = (await client.get("/__flags/console/experiments/hero")).text
        assert "<dt>Status</dt><dd>promoted" in after
        missing = await client.get("/__flags/console/experiments/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]


async def test_a_sample_ratio_mismatch_is_flagged(tmp_path: Path) -> None:
    app = experiment_app(tmp_path)
    record(app, {"control": 1000, "bold": 700}, {"control": 100, "bold": 70})
    async with client_of(app) as client:
        await sign_in(client)
        html = (await client.get("/__flags/console/experiments/hero")).text
        assert 'role="alert"><strong>Sample ratio mismatch</strong>' in html
        control = re.search(r'<tr data-variant="control">(.*?)</tr>', html, re.S)
        assert control is not None and 'class="tag">winner' in control.group(1)  # nothing beats it


async def test_the_demo_config_turns_the_console_on_with_its_printed_token() -> None:
    from support import REPO

    settings = load_settings(
        config_file=REPO / "config" / "demo.toml",
        env={"FLAGPROXY_EXPERIMENTS_ENABLED": "false"},
        origins=["http://127.0.0.1:9"],
    )
    app = FlagProxy(settings)
    async with client_of(app) as client:
        assert (await client.get("/__flags/console/")).status_code == 401  # on: the sign-in form
        makefile = (REPO / "Makefile").read_text()
        token = settings.admin.token
        assert token in makefile and "/__flags/console/" in makefile  # make run prints both
        assert "/__flags/console/" in (REPO / "README.md").read_text()
        assert (await client.post("/__flags/console/login", data={"token": token})).status_code == 303
        assert (await client.get("/__flags/console/")).status_code == 200


SPLIT_FLAG = {
    "name": "vendor-banner",
    "trafficTypeName": "user",
    "killed": False,
    "defaultTreatment": "off",
    "changeNumber": 5,
    "status": "ACTIVE",
    "seed": 1357,
    "trafficAllocation": 100,
    "trafficAllocationSeed": 2468,
    "algo": 2,
    "conditions": [
        {
            "conditionType": "ROLLOUT",
            "label": "default rule",
            "matcherGroup": {
                "combiner": "AND",
                "matchers": [
                    {"keySelector": {"trafficType": "user", "attribute": None}, "matcherType": "ALL_KEYS"}
                ],
            },
            "partitions": [{"treatment": "on", "size": 100}, {"treatment": "off", "size": 0}],
        }
    ],
}


async def test_a_vendor_flag_is_read_only_with_a_note_but_can_be_killed(
    app: FlagProxy, client: httpx.AsyncClient
) -> None:
    from proxy.store.change import Change, stored_text

    await app.store.apply(Change(source="split", upsert={"vendor-banner": stored_text(SPLIT_FLAG)}))
    assert "vendor-banner" in app.store.snapshot.flags
    csrf = await sign_in(client)
    listed = (await client.get("/__flags/console/?source=split")).text
    assert re.findall(r'data-flag="([^"]+)"', listed) == ["vendor-banner"]
    page = (await client.get("/__flags/console/flags/vendor-banner")).text
    note = re.search(r'<p class="note" role="note">(.*?)</p>', page, re.S)
    assert note is not None and "<strong>split</strong>: change its definition there" in note.group(1)
    assert 'data-action="save"' not in page and 'data-action="kill"' in page
    url = "/__flags/console/flags/vendor-banner"
    version = app.store.snapshot.version
    form = {"csrf": csrf, "action": "save", "what": "definition", "definition": '{"percentage": 1}'}
    refused = await client.post(url, data=form)
    assert refused.status_code == 409 and "comes from split" in refused.json()["detail"]
    assert app.store.snapshot.version == version and "vendor-banner" not in app.store.snapshot.raw.items(
        "native"
    )
    assert (await client.post(url, data={"csrf": csrf, "action": "kill"})).status_code == 303
    assert json.loads(override_of(app, "vendor-banner") or "null") == {"kill": True}
