"""Dot segments and path confusion: what the proxy routes is what the origin serves.

A real nginx is the origin behind a route prefix with ``strip_prefix`` and a base path: nginx decodes
``%2e``/``%2F``, merges slashes and resolves ``..`` before it picks a location, so a path that climbs
out of the base path would reach its ``/internal/`` location."""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import LOCALHOST, free_port, raw_exchange, raw_request, wait_for
from test_differential import accepting, nginx_binary

from proxy.config import OriginSettings, Settings
from proxy.dataplane.paths import normalise
from proxy.dataplane.upstream import Origin

NGINX_ORIGIN = """\
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {listen};
        location /public/ {{ return 200 "public $uri\\n"; }}
        location /internal/ {{ return 200 "SECRET $uri\\n"; }}
        location / {{ return 404 "nothing\\n"; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    directory = Path(tmp_path_factory.mktemp("nginx-origin"))
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_ORIGIN.format(dir=directory, listen=f"{LOCALHOST}:{port}"))
    cmd = [nginx_binary(), "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    process = subprocess.Popen(
        [*cmd, "-g", "daemon off; master_process off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: process.poll() is not None or accepting(port), timeout=10, what="nginx")
    yield port
    process.terminate()
    process.wait(5)


@pytest.fixture(scope="module")
def proxy(proxy_factory: Any, nginx_origin: int) -> Any:
    config = f"""
[[origins]]
prefix = "/api"
url = "http://{LOCALHOST}:{nginx_origin}/public"
strip_prefix = true
"""
    return proxy_factory(config=config, flags={"flags": {"f": {}}})


def get(proxy: Any, target: str) -> Any:
    return raw_exchange(proxy.port, raw_request("GET", target))


def test_the_base_path_serves(proxy: Any) -> None:
    response = get(proxy, "/api/page")
    assert response.status == 200 and response.body == b"public /public/page\n"


@pytest.mark.parametrize(
    "target",
    [
        "/api/../internal/secret",
        "/api/%2e%2e/internal/secret",
        "/api/%2E%2e/%2e%2E/internal/secret",
        "/api/..%2Finternal/secret",
        "/api/..%2F..%2Finternal/secret",
        "/api/x/..%2F..%2F..%2Finternal/secret",
        "/api/..%5Cinternal/secret",
        "/api/..\\internal/secret",
        "/api//..//internal/secret",
        "/api/..;/internal/secret",
        "/api/../api/../internal/secret",
        "/x/../api/../internal/secret",
        "/api/..%2Fapi/..%2F..%2Finternal/secret",
        "/..",
        "/../../etc/passwd",
    ],
)
def test_no_path_climbs_out_of_the_base_path(proxy: Any, target: str) -> None:
    response = get(proxy, target)
    assert b"SECRET" not in response.body
    assert response.status in (400, 404), (response.status, response.body)
    body = json.loads(response.body)
    assert body["error"] in ("bad_path", "no_route"), body


def test_a_path_that_climbs_is_refused_400_naming_the_problem(proxy: Any) -> None:
    response = get(proxy, "/api/%2e%2e/%2e%2e/internal/secret")
    assert response.status == 400 and json.loads(response.body)["error"] == "bad_path"


def test_dot_segments_inside_the_route_are_forwarded_as_sent(proxy: Any) -> None:
    response = get(proxy, "/api/a/../page")
    assert response.status == 200 and response.body == b"public /public/page\n"


@pytest.mark.parametrize(
    "target", ["//__flags/healthz", "/x/../__flags/healthz", "/%5F%5Fflags/healthz", "/.//__flags/./healthz"]
)
def test_the_control_prefix_is_found_after_normalising(proxy: Any, target: str) -> None:
    response = get(proxy, target)
    assert response.status == 200 and json.loads(response.body) == {"status": "ok"}


def test_no_redirect_is_built_from_the_host_header(proxy: Any) -> None:
    response = raw_exchange(proxy.port, raw_request("GET", "/__flags/api", host="evil.example"))
    assert response.status != 307 and "evil.example" not in (response.value("Location") or "")
    response = raw_exchange(proxy.port, raw_request("GET", "/__flags/healthz/", host="evil.example"))
    assert response.status == 404 and response.value("Location") is None


# --- the invariant, fuzzed against an independent reading ------------------------------------------

SEGMENTS = ["a", "b", ".", "..", "%2e", "%2E%2e", ".%2e", "..;x", "", "%2F", "%5C", "\\", "c%2Fd", "%41"]


def origin_reads(target: str) -> str | None:
    """How nginx-like origins read a path: decode, ``\\`` and ``;``-params of dot segments, merge,
    resolve dots (posixpath); None when it climbs above the root."""
    text = unquote(target).replace("\\", "/")
    parts = [p.split(";")[0] if p.split(";")[0] in (".", "..") else p for p in text.split("/")]
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part not in ("", "."):
            depth += 1
    return re.sub("/+", "/", posixpath.normpath("/" + "/".join(parts)))


ORIGIN = Origin.from_settings(
    OriginSettings(url="http://o.example/public", prefix="/api", strip_prefix=True), Settings()
)


@settings(max_examples=1000, deadline=None)
@given(segments=st.lists(st.sampled_from(SEGMENTS), max_size=8), under=st.booleans())
def test_no_forwarded_path_escapes_its_base(segments: list[str], under: bool) -> None:
    raw = ("/api/" if under else "/") + "/".join(segments)
    path = normalise(raw.encode())
    if path is None:
        assert origin_reads(raw) is None
        return
    assert origin_reads(raw) is not None
    assert re.sub("/+", "/", path.rstrip("/") or "/") == (origin_reads(raw) or "").rstrip("/") or "/"
    if not ORIGIN.matches(path.encode()) or not ORIGIN.strips_safely(raw.encode()):
        return  # another route, or refused
    forwarded = ORIGIN.target(raw.encode(), None).decode()
    served = origin_reads(forwarded)
    assert served is not None and (served == "/public" or served.startswith("/public/")), (raw, served)
