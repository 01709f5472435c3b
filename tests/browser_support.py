"""Debian's headless Chromium driven by chromedriver (selenium), for the browser tests
(tests/test_client_browser.py, tests/test_console_browser.py).

Both binaries come from one Chromium build, so the driver always speaks the browser's protocol;
nothing is downloaded at test time. scripts/ensure-chromium.sh installs them when missing (root +
apt-get, as ``make test`` does); without them the tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import LOCALHOST, REPO

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), installed by scripts/ensure-chromium.sh when missing; else a skip."""

    def found() -> tuple[str, str] | None:
        browser = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
        driver = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else shutil.which("chromedriver")
        return (browser, driver) if browser and driver else None

    binaries = found()
    if binaries is None:
        script = REPO / "scripts" / "ensure-chromium.sh"
        result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=600, check=False)
        binaries = found()
        if binaries is None:
            pytest.skip(
                f"chromium/chromedriver not installed and could not be installed: {result.stderr[-500:]}"
            )
    return binaries


@contextlib.contextmanager
def chrome(window_size: str = "800,600", script_timeout_s: float = 20.0) -> Iterator[Any]:
    """A headless Chromium session on loopback only, its console log kept (``get_log("browser")``)."""
    browser, chromedriver = chromium_binaries()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the test may run as root (containers)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--no-proxy-server",  # loopback only, whatever the environment says
        "--disable-background-networking",
        "--disable-component-update",
        f"--window-size={window_size}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_script_timeout(script_timeout_s)
    try:
        yield driver
    finally:
        driver.quit()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class StaticSite:
    """A directory served on its own port: one origin ``http://127.0.0.1:<port>``."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer((LOCALHOST, 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, name=f"site-{self.port}", daemon=True
        )

    @property
    def origin(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def __enter__(self) -> StaticSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
