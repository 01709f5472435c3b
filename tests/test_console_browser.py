"""The web console in headless Chromium, against a real ``flagproxy serve`` and a real origin on
127.0.0.1: sign in, kill a flag and see the origin receive the new value, edit weights (a validation
error, then a valid edit), promote an experiment's winner, live updates without a reload, and the
refusals (wrong token, CSRF, another site).

    pytest -m browser tests/test_console_browser.py      # about 15 s with Chromium installed

Chromium and chromedriver: tests/browser_support.py (Debian's packages, installed by
scripts/ensure-chromium.sh when missing; the module is skipped, saying why, when they cannot be).
Each view is saved as a screenshot in the test's artefact directory (printed); with
``FLAGPROXY_DOCS_SCREENSHOTS=1`` they are copied into docs/console/ as well (docs/console.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import StaticSite, chrome
from support import REPO, ProxyProcess, RawOrigin, http_client, served_flags, wait_for

pytestmark = pytest.mark.browser

TOKEN = "console-browser-admin-token"
DOCS = REPO / "docs" / "console"
FLAGS = {
    "flags": {
        "new-checkout": {"percentage": 100, "priority": 20, "note": "the one-page checkout"},
        "layout": {
            "variants": {"classic": {"weight": 50}, "compact": {"weight": 50, "config": {"rows": 3}}},
            "defaultVariant": "classic",
            "rules": [{"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "compact"}],
        },
        "hero": {
            "variants": {"control": {"weight": 50}, "bold": {"weight": 50}},
            "defaultVariant": "control",
            "experiment": {"control": "control", "goals": ["signup"]},
        },
        "shop-banner": {"routes": ["/shop/**"], "percentage": 25},
        "ENABLE_VERBOSE_ERRORS": {"enabled": False, "priority": 100},
    }
}
USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chrome(window_size="1280,900") as browser:
        yield browser


@pytest.fixture(scope="module")
def proxy(origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory([origin.url], flags=FLAGS, env={"FLAGPROXY_ADMIN_TOKEN": TOKEN})


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the screenshots go; copied into docs/console/ with FLAGPROXY_DOCS_SCREENSHOTS=1."""
    out = tmp_path_factory.mktemp("console-screens")
    yield out
    print(f"console screenshots: {out}")
    if os.environ.get("FLAGPROXY_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        for png in sorted(out.glob("*.png")):
            shutil.copy(png, DOCS / png.name)


# --- helpers ---------------------------------------------------------------------------------------------


def admin(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> dict[str, Any]:
    response = http_client().request(
        method,
        f"{proxy.base_url}/__flags/api{path}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        content=None if body is None else json.dumps(body),
    )
    assert response.status_code == 200, (method, path, response.status_code, response.text)
    return response.json()


def stored(proxy: ProxyProcess, key: str) -> dict[str, Any]:
    return admin(proxy, "GET", f"/flags/{key}")


def open_streams(proxy: ProxyProcess) -> float:
    response = http_client().get(f"{proxy.base_url}/__flags/metrics")
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("flagproxy_client_streams ")]
    assert len(lines) == 1, "no flagproxy_client_streams gauge in /__flags/metrics"
    return float(lines[0].split()[-1])


def visit(driver: Any, proxy: ProxyProcess, path: str) -> None:
    driver.get(f"{proxy.base_url}/__flags/console{path}")


def submit(driver: Any, css: str) -> None:
    """Click a submit button and wait for the page it leads to."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element("tag name", "html")
    driver.find_element("css selector", css).click()
    WebDriverWait(driver, 10).until(expected_conditions.staleness_of(old))


def fill(driver: Any, css: str, text: str) -> None:
    field = driver.find_element("css selector", css)
    field.clear()
    field.send_keys(text)


def alerts(driver: Any) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", '[role="alert"]')]


def shot(driver: Any, screens: Path, name: str) -> None:
    """The whole page, beyond the window (Chromium's own full-page capture)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
    capture = {"format": "png", "captureBeyondViewport": True, "clip": clip}
    data = driver.execute_cdp_cmd("Page.captureScreenshot", capture)["data"]
    (screens / f"{name}.png").write_bytes(base64.b64decode(data))


def sign_in(driver: Any, proxy: ProxyProcess, token: str = TOKEN) -> None:
    visit(driver, proxy, "/")
    if driver.find_elements("css selector", "tr[data-flag]"):
        return  # signed in already
    fill(driver, "#token", token)
    submit(driver, ".login button[type=submit]")


def state(driver: Any, key: str) -> str:
    """The row's state, read in one script call (live updates may swap the rows in between)."""
    script = (
        'const r = document.querySelector(`tr[data-flag="${arguments[0]}"]`); return r && r.dataset.state;'
    )
    return str(driver.execute_script(script, key))


# --- the tests, in the order a person would go ------------------------------------------------------


def test_a_wrong_token_is_refused(driver: Any, proxy: ProxyProcess, screens: Path) -> None:
    driver.delete_all_cookies()
    visit(driver, proxy, "/")
    assert driver.find_elements("css selector", "tr[data-flag]") == []
    shot(driver, screens, "sign-in")
    fill(driver, "#token", "not-the-token")
    submit(driver, ".login button[type=submit]")
    assert alerts(driver) == ["That is not the admin token."]
    assert driver.get_cookies() == []
    assert driver.find_elements("css selector", "tr[data-flag]") == []


def test_sign_in_and_kill_a_flag_the_origin_gets_the_new_value(
    driver: Any, proxy: ProxyProcess, origin: RawOrigin, screens: Path
) -> None:
    assert served_flags(proxy, origin, "user-1")["new-checkout"] is True
    sign_in(driver, proxy)
    [cookie] = driver.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""  # script cannot read the session
    keys = [e.get_attribute("data-flag") for e in driver.find_elements("css selector", "tr[data-flag]")]
    assert keys == sorted(FLAGS["flags"])
    shot(driver, screens, "flags")
    submit(driver, 'tr[data-flag="new-checkout"] button[data-action="kill"]')
    assert state(driver, "new-checkout") == "killed"
    assert served_flags(proxy, origin, "user-1")["new-checkout"] is False
    row = driver.find_element("css selector", 'tr[data-flag="new-checkout"]').text
    assert "kill by console" in row
    submit(driver, 'tr[data-flag="new-checkout"] button[data-action="restore"]')
    assert state(driver, "new-checkout") == "enabled"
    assert served_flags(proxy, origin, "user-1")["new-checkout"] is True


def test_edit_weights_a_validation_error_then_a_valid_edit(
    driver: Any, proxy: ProxyProcess, origin: RawOrigin, screens: Path
) -> None:
    sign_in(driver, proxy)
    before = stored(proxy, "layout")["definition"]
    visit(driver, proxy, "/flags/layout")
    fill(driver, 'input[name="weight.classic"]', "-10")
    submit(driver, '.weights button[data-action="save"]')
    [message] = alerts(driver)
    assert "variants.classic.weight" in message and ">= 0" in message
    field = driver.find_element("css selector", 'input[name="weight.classic"]')
    assert field.get_attribute("aria-invalid") == "true"
    error_id = field.get_attribute("aria-describedby")
    assert driver.find_element("id", error_id).text == message  # the message next to its field
    shot(driver, screens, "flag-edit-error")
    assert stored(proxy, "layout")["definition"] == before
    fill(driver, 'input[name="weight.classic"]', "0")
    fill(driver, 'input[name="weight.compact"]', "100")
    submit(driver, '.weights button[data-action="save"]')
    assert alerts(driver) == []
    variants = stored(proxy, "layout")["definition"]["variants"]
    assert variants == {"classic": {"weight": 0}, "compact": {"weight": 100, "config": {"rows": 3}}}
    assert {served_flags(proxy, origin, user)["layout"] for user in USERS[:8]} == {"compact"}
    visit(driver, proxy, "/flags/layout")
    shot(driver, screens, "flag-edit")


def test_promote_the_winner_from_the_experiments_view(
    driver: Any, proxy: ProxyProcess, origin: RawOrigin, screens: Path
) -> None:
    sign_in(driver, proxy)
    got = {user: served_flags(proxy, origin, user)["hero"] for user in USERS}
    assert set(got.values()) == {"control", "bold"}
    bold = [user for user, variant in got.items() if variant == "bold"]
    control = [user for user, variant in got.items() if variant == "control"]
    events = [{"key": user, "event": "signup"} for user in bold[: len(bold) * 3 // 4] + control[:1]]
    tracked = http_client().post(
        f"{proxy.base_url}/__flags/api/track",
        headers={"Authorization": f"Bearer {TOKEN}"},
        content=json.dumps({"events": events}),
    )
    assert tracked.status_code == 200, tracked.text
    visit(driver, proxy, "/experiments")
    shot(driver, screens, "experiments")
    visit(driver, proxy, "/experiments/hero")
    rows = driver.find_elements("css selector", "table.results tbody tr")
    assert [r.get_attribute("data-variant") for r in rows] == ["control", "bold"]
    assert rows[1].find_elements("css selector", ".tag")[0].text == "winner"
    assert driver.find_elements("css selector", "svg.chart rect.bar")
    shot(driver, screens, "experiment")
    submit(driver, 'button[data-action="promote"]')
    assert driver.current_url.endswith("/__flags/console/experiments/hero")
    facts = driver.find_element("css selector", "dl.facts").text
    assert "promoted" in facts
    assert stored(proxy, "hero")["override"] == {"promote": "bold"}
    assert {served_flags(proxy, origin, user)["hero"] for user in control[:5]} == {"bold"}


def test_the_other_views(driver: Any, proxy: ProxyProcess, screens: Path) -> None:
    sign_in(driver, proxy)
    visit(driver, proxy, "/budget")
    assert driver.find_elements("css selector", 'tr[data-route="*"] svg rect.bar')
    shot(driver, screens, "budget")
    visit(driver, proxy, "/")
    submit(driver, 'tr[data-flag="ENABLE_VERBOSE_ERRORS"] button[data-action="kill"]')
    submit(driver, 'tr[data-flag="ENABLE_VERBOSE_ERRORS"] button[data-action="restore"]')
    visit(driver, proxy, "/audit?actor=console&flag=ENABLE_VERBOSE_ERRORS")
    actions = [e.text for e in driver.find_elements("css selector", "table.audit tbody tr td:nth-child(3)")]
    assert actions == ["restore", "kill"]
    visit(driver, proxy, "/audit")
    shot(driver, screens, "audit")
    visit(driver, proxy, "/evaluate")
    fill(driver, "#e-key", "user-7")
    fill(driver, "#e-path", "/shop/cart")
    fill(driver, "#e-attributes", "plan=pro")
    submit(driver, ".evaluate button[type=submit]")
    cells = driver.find_elements("css selector", 'tr[data-flag="shop-banner"] td')
    assert cells, "shop-banner applies to /shop/cart"
    shot(driver, screens, "evaluate")


def test_live_updates_without_a_reload_and_the_stream_closes_on_pagehide(
    driver: Any, proxy: ProxyProcess
) -> None:
    sign_in(driver, proxy)
    visit(driver, proxy, "/")
    wait_for(
        lambda: driver.execute_script("return document.body.dataset.live") == "open",
        timeout=10,
        what="the console's event stream",
    )
    wait_for(lambda: open_streams(proxy) == 1, timeout=10, what="the stream counted by the proxy")
    driver.execute_script("window.notReloaded = true")
    admin(proxy, "POST", "/flags/shop-banner/kill")
    wait_for(lambda: state(driver, "shop-banner") == "killed", timeout=5, what="the kill on the page")
    assert driver.execute_script("return window.notReloaded") is True
    admin(proxy, "POST", "/flags/shop-banner/restore")
    wait_for(lambda: state(driver, "shop-banner") == "enabled", timeout=5, what="the restore on the page")
    driver.get("about:blank")  # pagehide: the page closes its stream
    wait_for(lambda: open_streams(proxy) == 0, timeout=10, what="the stream closed on pagehide")


def test_writes_without_the_csrf_token_or_from_another_site_are_refused(
    driver: Any, proxy: ProxyProcess, tmp_path: Path
) -> None:
    sign_in(driver, proxy)
    visit(driver, proxy, "/")
    status = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/__flags/console/flags/layout', {method: 'POST',
              body: new URLSearchParams({action: 'kill', csrf: 'not-the-token'})})
          .then((r) => r.json().then((b) => done([r.status, b.error])));
        """
    )
    assert status == [403, "csrf"]
    assert "override" not in stored(proxy, "layout")
    # a page on another origin posting a form to the console. Another port of 127.0.0.1 is the same
    # *site*, so the SameSite=Strict cookie goes along: Origin / Sec-Fetch-Site is what refuses it
    action = f"{proxy.base_url}/__flags/console/flags/layout"
    (tmp_path / "attack.html").write_text(
        f'<form method="post" action="{action}"><input name="action" value="kill"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    with StaticSite(tmp_path) as site:
        driver.get(f"{site.origin}/attack.html")
        wait_for(lambda: driver.current_url.startswith(proxy.base_url), timeout=10, what="the form's post")
    body = json.loads(driver.find_element("tag name", "body").text)
    assert body["error"] == "cross_site", body
    assert site.origin in body["detail"] or "Sec-Fetch-Site" in body["detail"], body
    assert "override" not in stored(proxy, "layout")
