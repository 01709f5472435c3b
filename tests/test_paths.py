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

from proxy.config import ConfigError, OriginSettings, Settings, load_settings
from proxy.dataplane.paths import BadPath, normalise
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

[[origins]]
prefix = "/public"
url = "http://{LOCALHOST}:{nginx_origin}"
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
        # routed as /public/x by a lenient reading, served as /internal/... by nginx
        "/internal/#/../../public/x",
        "/internal/x#/../../public/x",
        "/internal/x/..;/../public/x",
        "/internal/x/..%3b/../public/x",
        "/internal/x/.;/../../public/x",
        "/internal/x/..\\../public/x",
        "/internal/x/..%5c../public/x",
        "/internal/x/..%2F../public/x",
        "/internal//../public/x",
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
    response = get(proxy, "/internal/../public/page")  # every reading agrees: /public/page
    assert response.status == 200 and response.body == b"public /public/page\n"


@pytest.mark.parametrize(
    "target", ["//__flags/healthz", "/x/../__flags/healthz", "/%5F%5Fflags/healthz", "/./__flags/./healthz"]
)
def test_the_control_prefix_is_found_after_normalising(proxy: Any, target: str) -> None:
    response = get(proxy, target)
    assert response.status == 200 and json.loads(response.body) == {"status": "ok"}


def test_no_redirect_is_built_from_the_host_header(proxy: Any) -> None:
    response = raw_exchange(proxy.port, raw_request("GET", "/__flags/api", host="evil.example"))
    assert response.status != 307 and "evil.example" not in (response.value("Location") or "")
    response = raw_exchange(proxy.port, raw_request("GET", "/__flags/healthz/", host="evil.example"))
    assert response.status == 404 and response.value("Location") is None


# --- the invariant, fuzzed against two independent readings ------------------------------------

SEGMENTS = [
    "a",
    "b",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "..;x",
    ".;",
    "",
    "%2F",
    "%5C",
    "\\",
    "c%2Fd",
    "%41",
]


def climbing(parts: list[str]) -> str | None:
    depth, out = 0, []
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
            out.append(part)
        elif part != ".":
            depth += 1 if part else 0
            out.append(part)
    return posixpath.normpath("/" + "/".join(p for p in out if p)) + (
        "/" if parts and parts[-1] in ("", ".", "..") else ""
    )


def lenient(target: str) -> str | None:
    """nginx/IIS/Tomcat at their most lenient: decode, ``\\`` separates, ``..;x`` is ``..``."""
    text = unquote(target).replace("\\", "/")
    parts = [p.split(";")[0] if p.split(";")[0] in (".", "..") else p for p in text.split("/")[1:]]
    return climbing(parts)


def strict(target: str) -> str | None:
    """RFC 3986 §5.2.4 on the raw segments: dot segments are exactly . or .. once decoded."""
    parts = [unquote(p) if unquote(p) in (".", "..") else p for p in target.split("/")[1:]]
    depth = 0
    out: list[str] = []
    for part in parts:
        if part == "..":
            if not out:
                return None
            out.pop()
        elif part != ".":
            out.append(part)
    del depth
    if parts and parts[-1] in (".", ".."):
        out.append("")
    return unquote("/" + "/".join(out))


ORIGIN = Origin.from_settings(
    OriginSettings(url="http://o.example/public", prefix="/api", strip_prefix=True), Settings()
)


def dotted(raw: str) -> bool:
    text = unquote(raw).replace("\\", "/")
    return any(p.split(";")[0] in (".", "..") for p in text.split("/"))


@settings(max_examples=1000, deadline=None)
@given(segments=st.lists(st.sampled_from(SEGMENTS), max_size=8), under=st.booleans())
def test_an_accepted_path_reads_the_same_to_every_origin_and_never_escapes_its_base(
    segments: list[str], under: bool
) -> None:
    raw = ("/api/" if under else "/") + "/".join(segments)
    try:
        path = normalise(raw.encode())
    except BadPath:
        return  # refused: nothing reaches an origin
    if dotted(raw):  # the readings must agree on where dot segments lead
        merged = re.sub("/+", "/", strict(raw) or "")
        assert path == merged, (raw, path, merged)
        assert (lenient(raw) or "").rstrip("/") == path.rstrip("/"), (raw, path, lenient(raw))
    if not ORIGIN.matches(path.encode()) or not ORIGIN.strips_safely(raw.encode()):
        return  # another route, or refused
    forwarded = ORIGIN.target(raw.encode(), None).decode()
    for reading in (lenient, strict):
        served = re.sub("/+", "/", reading(forwarded) or "")
        assert served == "/public" or served.startswith("/public/"), (raw, reading.__name__, served)


@pytest.mark.parametrize("prefix", ["/a%20b", "/café", "/a/../b", "/a//b", "/a;x", "/a\\b"])
def test_an_origin_prefix_routing_could_never_match_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix must be a plain ASCII path"):
        load_settings(env={}, origins=[f"{prefix}=http://127.0.0.1:9"])
