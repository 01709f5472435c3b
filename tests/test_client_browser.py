"""The client flags API with the real web client: the OpenFeature web SDK and
``@openfeature/ofrep-web-provider`` in headless Chromium, on a page served from another origin than the
proxy.

    pytest -m browser            # this module alone (≈ 10 s once Chromium and the npm packages are there)

What runs, all on 127.0.0.1:

- Debian's ``chromium`` driven through Debian's ``chromium-driver`` by selenium (tests/browser_support.py:
  nothing is downloaded at test time; scripts/ensure-chromium.sh installs them when missing, as
  ``make test`` does; without them the module is skipped).
- The JS packages pinned in tests/browser/package-lock.json, installed with ``npm ci`` into
  ``.cache/browser-npm/<lock hash>/`` (outside git, reused while the lock file is unchanged) and loaded
  by the page as ES modules through an import map built from each package's ``package.json``. No CDN.
- Two static servers (two origins) serving tests/browser/app.js: one listed in ``[client_api]
  cors_origins``, one not.
- A real ``flagproxy serve`` with one ``[[client_keys]]`` entry and the admin token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from browser_support import StaticSite, chrome
from support import REPO, ProxyProcess, RawOrigin, http_client, wait_for

pytestmark = pytest.mark.browser

BROWSER_DIR = REPO / "tests" / "browser"
NPM_CACHE = REPO / ".cache" / "browser-npm"
ADMIN_TOKEN = "browser-admin-token"
CLIENT_KEY = "ck-browser-7f3a9c"
USER = {"targetingKey": "user-1", "plan": "pro"}  # "plan" is an attribute the rules below target
FLAGS = {
    "flags": {
        "banner": {  # the one the test kills: user-1 gets "gold" by a rule, the default is "basic"
            "variants": {"basic": {"weight": 50}, "gold": {"weight": 50}},
            "defaultVariant": "basic",
            "rules": [{"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "gold"}],
        },
        "layout": {  # a variant with a config: OFREP's value is the config object
            "variants": {"classic": {"weight": 50}, "compact": {"weight": 50, "config": {"rows": 3}}},
            "defaultVariant": "classic",
            "rules": [{"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "compact"}],
        },
        "new-checkout": {"percentage": 100},
        "ops-secret": {"percentage": 100},  # outside the client key's globs: not found for the page
    }
}
KEY_GLOBS = ["banner", "layout", "new-*"]
# what the page reads, each with the type of its fallback (the SDK's typed getters)
PAGE_FLAGS = ["banner:string", "layout:object", "new-checkout:boolean", "ops-secret:boolean"]
SSE_BUDGET_S = 1.0  # issue 17: an admin change reaches a connected browser in <= 1 s
READY_TIMEOUT_S = 15.0


# --- the browser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chrome(script_timeout_s=READY_TIMEOUT_S + 5) as browser:
        yield browser


# --- the JS packages and the page ----------------------------------------------------------------------


def npm_packages() -> Path:
    """``node_modules`` of tests/browser/package-lock.json, installed once per lock file by ``npm ci``."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed to install the OpenFeature web packages")
    lock = (BROWSER_DIR / "package-lock.json").read_bytes()
    target = NPM_CACHE / hashlib.sha256(lock + (BROWSER_DIR / "package.json").read_bytes()).hexdigest()[:16]
    if (target / "node_modules" / ".complete").exists():
        return target / "node_modules"
    staging = NPM_CACHE / f"staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(BROWSER_DIR / name, staging / name)
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        cwd=staging,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed ({result.returncode}):\n{result.stderr[-2000:]}"
    (staging / "node_modules" / ".complete").touch()
    try:
        staging.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules"


def esm_entry(package_dir: Path) -> str:
    """The ES-module entry of a package, from its ``package.json``: ``exports["."].module``, then the
    top-level ``module``, then ``exports["."].import`` (relative to the package directory)."""
    meta = json.loads((package_dir / "package.json").read_text())
    exports = meta.get("exports")
    root = exports.get(".", exports) if isinstance(exports, dict) else {}
    for candidate in (root.get("module"), meta.get("module"), root.get("import")):
        if isinstance(candidate, str):
            return candidate.removeprefix("./")
    raise AssertionError(f"{meta['name']}: no ES-module entry in package.json")


IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"']+)["']""")


def import_map(node_modules: Path) -> dict[str, str]:
    """Bare specifier → URL for every package installed, checked: every module reachable from the
    entries imports only specifiers the map resolves (or relative files)."""
    packages = sorted(p.parent for p in node_modules.glob("*/*/package.json")) + sorted(
        p.parent for p in node_modules.glob("[!@.]*/package.json")
    )
    imports = {
        json.loads((p / "package.json").read_text())["name"]: f"/node_modules/{p.relative_to(node_modules)}/"
        + esm_entry(p)
        for p in packages
    }
    todo = [node_modules.parent / url.lstrip("/") for url in imports.values()]
    seen: set[Path] = set()
    while todo:
        module = todo.pop().resolve()
        if module in seen:
            continue
        seen.add(module)
        for spec in IMPORT.findall(module.read_text()):
            if spec.startswith((".", "/")):
                todo.append((module.parent / spec).resolve())
            else:
                assert spec in imports, f"{module.name} imports {spec!r}, which no installed package provides"
    return imports


PAGE = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>flagproxy client flags</title>
<link rel="icon" href="data:,">
<script type="importmap">{import_map}</script>
<script type="module" src="/app.js"></script>
</head>
<body>
<h1>flagproxy client flags (OpenFeature web SDK, OFREP)</h1>
<p id="status">loading</p>
<ul id="flags"></ul>
</body>
</html>
"""


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StaticSite, StaticSite]]:
    """(allowed, refused): the same page on two origins; only the first is in ``cors_origins``."""
    node_modules = npm_packages()
    root = tmp_path_factory.mktemp("site")
    (root / "node_modules").symlink_to(node_modules, target_is_directory=True)
    (root / "index.html").write_text(
        PAGE.format(import_map=json.dumps({"imports": import_map(node_modules)}))
    )
    shutil.copy(BROWSER_DIR / "app.js", root / "app.js")
    with StaticSite(root) as allowed, StaticSite(root) as refused:
        yield allowed, refused


@pytest.fixture(scope="module")
def proxy(
    sites: tuple[StaticSite, StaticSite], origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> ProxyProcess:
    allowed, _ = sites
    config = f"""
[client_api]
cors_origins = ["{allowed.origin}"]

[[client_keys]]
name = "web"
key = "{CLIENT_KEY}"
flags = {json.dumps(KEY_GLOBS)}
"""
    return proxy_factory([origin.url], config=config, flags=FLAGS, env={"FLAGPROXY_ADMIN_TOKEN": ADMIN_TOKEN})


# --- helpers ---------------------------------------------------------------------------------------------


def admin(proxy: ProxyProcess, method: str, path: str) -> dict[str, Any]:
    response = http_client().request(
        method, f"{proxy.base_url}/__flags/api{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200, (method, path, response.status_code, response.text)
    return response.json()


def open_streams(proxy: ProxyProcess) -> float:
    """The proxy's ``flagproxy_client_streams`` gauge: live-update streams open now."""
    response = http_client().get(
        f"{proxy.base_url}/__flags/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("flagproxy_client_streams ")]
    assert len(lines) == 1, "no flagproxy_client_streams gauge in /__flags/metrics"
    return float(lines[0].split()[-1])


def expected_ofrep(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    """What the page must read, from the proxy's own evaluation for the same unit and attributes
    (``/__flags/api/evaluate``), mapped as issue 17 says: booleans are the value with variant
    "true"/"false"; variants are the variant's config when it has one, else its name."""
    attributes = {f"attr.{k}": v for k, v in USER.items() if k != "targetingKey"}
    query = urlencode({"key": USER["targetingKey"], **attributes})
    flags = admin(proxy, "GET", f"/evaluate?{query}")["flags"]
    out = {}
    for key, got in flags.items():
        value = got["value"]
        if isinstance(value, bool):
            out[key] = {"value": value, "variant": "true" if value else "false"}
        else:
            out[key] = {"value": got.get("config", value), "variant": value}
    return out


def page_url(site: StaticSite, proxy: ProxyProcess) -> str:
    query = {
        "baseUrl": f"{proxy.base_url}/__flags",
        "key": CLIENT_KEY,
        "flags": ",".join(PAGE_FLAGS),
        "context": json.dumps(USER),
    }
    return f"{site.origin}/index.html?{urlencode(query)}"


class Console:
    """The browser's console messages of one page (``get_log`` hands each message out only once)."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.lines: list[str] = []

    def text(self) -> str:
        self.lines += [f"{e['level']} {e['message']}" for e in self.driver.get_log("browser")]
        return "\n".join(self.lines)


def shown(driver: Any, key: str) -> dict[str, Any]:
    """What the DOM shows for ``key`` now."""
    text = driver.find_element("css selector", f'li[data-flag="{key}"]').text
    name, _, details = text.partition(": ")
    assert name == key, text
    return json.loads(details)


def wait_settled(driver: Any) -> str:
    """The page's status once the provider is ready or has failed (awaited in the page, bounded)."""
    status = driver.execute_async_script(
        """
        const [timeoutMs, done] = arguments;
        const node = document.getElementById('status');
        const settled = () => node.textContent !== 'loading';
        if (settled()) { done(node.textContent); return; }
        const observer = new MutationObserver(() => {
          if (settled()) { observer.disconnect(); done(node.textContent); }
        });
        observer.observe(node, { childList: true, characterData: true, subtree: true });
        setTimeout(() => { observer.disconnect(); done(node.textContent); }, timeoutMs);
        """,
        int(READY_TIMEOUT_S * 1000),
    )
    return str(status)


def wait_render(driver: Any, n: int, timeout_s: float) -> dict[str, Any] | None:
    """Render number ``n`` (0 = the first) of the page, awaited in the page; None at the deadline."""
    render = driver.execute_async_script(
        "const [n, timeoutMs, done] = arguments; window.waitForRender(n, timeoutMs).then(done);",
        n,
        max(1, int(timeout_s * 1000)),
    )
    return render


def page_fetch(driver: Any, url: str, headers: dict[str, str], body: Any) -> dict[str, Any]:
    """One ``fetch`` from the page's origin: status, the headers script may read, or the error."""
    return driver.execute_async_script(
        """
        const [url, headers, body, done] = arguments;
        fetch(url, { method: 'POST', headers, body: JSON.stringify(body) })
          .then((r) => done({ status: r.status, etag: r.headers.get('ETag'), type: r.type }))
          .catch((e) => done({ error: `${e.name}: ${e.message}` }));
        """,
        url,
        headers,
        body,
    )


@contextlib.contextmanager
def page(driver: Any, url: str, artefacts: Path, name: str) -> Iterator[Console]:
    """``url`` open for the block; a screenshot and the browser's console into ``artefacts`` afterwards
    (whatever happened), and a blank page at the end (closes the page's event stream)."""
    driver.get_log("browser")  # what earlier pages left
    console = Console(driver)
    driver.get(url)
    try:
        yield console
    finally:
        driver.save_screenshot(str(artefacts / f"{name}.png"))
        (artefacts / f"{name}.console.txt").write_text(console.text())
        print(f"browser artefacts: {artefacts / name}.png, {name}.console.txt")
        driver.get("about:blank")


# --- the tests -------------------------------------------------------------------------------------------


def test_web_provider_reads_the_proxys_values_and_an_admin_kill_arrives_by_sse(
    driver: Any, sites: tuple[StaticSite, StaticSite], proxy: ProxyProcess, tmp_path: Path
) -> None:
    allowed, _ = sites
    expected = expected_ofrep(proxy)
    with page(driver, page_url(allowed, proxy), tmp_path, "allowed-origin") as console:
        status = wait_settled(driver)
        assert status == "ready", f"provider not ready: {status}\n{console.text()}"
        first = wait_render(driver, 0, 1.0)
        assert first is not None
        read = first["flags"]
        for key in ("banner", "layout", "new-checkout"):
            assert read[key]["errorCode"] is None, (key, read[key])
            assert {k: read[key][k] for k in ("value", "variant")} == expected[key], key
        assert read["banner"]["value"] == "gold"  # the rule on "plan": attributes reach targeting
        assert read["layout"]["value"] == {"rows": 3}
        # outside the key's globs: the proxy answers as if the flag did not exist
        assert read["ops-secret"]["errorCode"] == "FLAG_NOT_FOUND"
        assert read["ops-secret"]["value"] is False  # the code's default
        assert shown(driver, "banner")["value"] == "gold"
        driver.save_screenshot(str(tmp_path / "ready.png"))

        # the provider opens its event stream (the advertised URL with a token: EventSource sends no
        # headers) once ready; a change made before the proxy counts it would not reach the page
        wait_for(lambda: open_streams(proxy) == 1, timeout=READY_TIMEOUT_S, what="the page's event stream")
        renders = len(driver.execute_script("return window.renders"))
        killed_at = time.time()
        assert admin(proxy, "POST", "/flags/banner/kill")["changed"] == ["banner"]
        deadline = killed_at + 5.0  # well past the budget: a slow delivery is measured, not cut off
        while True:
            render = wait_render(driver, renders, deadline - time.time())
            assert render is not None, (
                f"the kill did not reach the page in 5 s\nprovider events: "
                f"{driver.execute_script('return window.providerEvents')}\n{console.text()}"
            )
            if render["flags"]["banner"]["value"] != "gold":
                break
            renders += 1
        latency_s = render["at"] / 1000 - killed_at
        print(f"admin kill -> page re-rendered via SSE in {latency_s * 1000:.0f} ms")
        assert render["flags"]["banner"]["value"] == expected_ofrep(proxy)["banner"]["value"] == "basic"
        assert render["flags"]["layout"]["value"] == {"rows": 3}  # the other flags are untouched
        assert shown(driver, "banner")["value"] == "basic"
        assert latency_s <= SSE_BUDGET_S, f"kill -> page took {latency_s:.3f} s (budget {SSE_BUDGET_S} s)"
    admin(proxy, "POST", "/flags/banner/restore")
    assert CLIENT_KEY not in proxy.stderr()


def test_the_page_can_read_the_etag_and_revalidate(
    driver: Any, sites: tuple[StaticSite, StaticSite], proxy: ProxyProcess, tmp_path: Path
) -> None:
    """Cross-origin script sees ETag only through Access-Control-Expose-Headers; If-None-Match (not a
    safelisted header) passes the preflight."""
    allowed, _ = sites
    url = f"{proxy.base_url}/__flags/ofrep/v1/evaluate/flags"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    with page(driver, page_url(allowed, proxy), tmp_path, "etag") as console:
        first = page_fetch(driver, url, headers, {"context": USER})
        assert first.get("status") == 200, (first, console.text())
        assert first["type"] == "cors"
        assert first["etag"], "ETag not readable by the page (Access-Control-Expose-Headers)"
        again = page_fetch(driver, url, {**headers, "If-None-Match": first["etag"]}, {"context": USER})
        assert again.get("status") == 304, (again, console.text())


def test_a_page_from_an_origin_not_allowed_is_refused_by_cors(
    driver: Any, sites: tuple[StaticSite, StaticSite], proxy: ProxyProcess, tmp_path: Path
) -> None:
    _, refused = sites
    url = f"{proxy.base_url}/__flags/ofrep/v1/evaluate/flags"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    with page(driver, page_url(refused, proxy), tmp_path, "refused-origin") as console:
        status = wait_settled(driver)
        assert status.startswith("error:"), f"the provider became {status!r} on an origin not allowed"
        assert driver.execute_script("return window.renders.length") == 0
        raw = page_fetch(driver, url, headers, {"context": USER})
        assert raw.get("error", "").startswith("TypeError"), raw  # what a CORS refusal looks like to script
        assert "CORS policy" in console.text(), console.text()
    # the same request outside a browser works: the refusal is CORS's, not the key's or the body's
    direct = http_client().post(
        url, headers={**headers, "Origin": refused.origin}, content=json.dumps({"context": USER})
    )
    assert direct.status_code == 200, direct.text
    assert direct.headers.get("access-control-allow-origin") not in (refused.origin, "*")
    preflight = httpx.Request(
        "OPTIONS",
        url,
        headers={
            "Origin": refused.origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    answer = http_client().send(preflight)
    assert answer.headers.get("access-control-allow-origin") not in (refused.origin, "*")
