"""Flag spoofing through underscore names: WSGI and CGI origins read ``X_Feature_Flags`` as
``X-Feature-Flags`` (``HTTP_X_FEATURE_FLAGS``), so such names never carry a client's flags through.

The origin here is the standard library's ``wsgiref`` server, which maps ``-`` and ``_`` alike, as
gunicorn and cheroot do."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import LOCALHOST, raw_exchange, raw_request
from test_differential import HOP_BY_HOP

from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.header_rules import BadRequest, RequestRules

FLAGS = {"flags": {"beta": {"enabled": False}}}
FORGED = '{"beta":true}'


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def wsgi_origin() -> Iterator[str]:
    """A WSGI app answering with the ``HTTP_*`` environ it saw, as JSON."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(seen).encode()]

    server: WSGIServer = make_server(LOCALHOST, 0, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOCALHOST}:{server.server_port}"
    server.shutdown()
    server.server_close()


def environ_through(port: int, headers: list[tuple[str, str]]) -> dict[str, str]:
    response = raw_exchange(port, raw_request("GET", "/x", headers))
    assert response.status == 200, response.body
    seen: dict[str, str] = json.loads(response.body)
    return seen


SPELLINGS = [
    "X_Feature_Flags",
    "X-Feature_Flags",
    "x_feature-flags",
    "X_FEATURE_FLAGS",
    "X_Feature_Flags_Config",
    "X-Feature-Flags_Omitted",
    "X_Feature_Flags_Signature",
]


@pytest.fixture(scope="module")
def padded_proxy(proxy_factory: Any, wsgi_origin: str) -> Any:
    """A budget so small that a padded request leaves no room for the proxy's own flag header."""
    config = "[header]\nlimit_bytes = 900\nreserve_bytes = 0\n"
    return proxy_factory([wsgi_origin], config=config, flags=FLAGS)


@pytest.mark.parametrize("name", SPELLINGS)
def test_an_underscore_spelling_never_reaches_a_wsgi_origin(padded_proxy: Any, name: str) -> None:
    # unpadded: the origin reads the proxy's own value
    seen = environ_through(padded_proxy.port, [(name, FORGED)])
    assert seen.get("HTTP_X_FEATURE_FLAGS") == '{"beta":false}'
    assert FORGED not in seen.values(), seen
    # padded past the budget: the proxy sends only the count; the client's value must not stand in
    seen = environ_through(padded_proxy.port, [(name, FORGED), ("X-Pad", "p" * 900)])
    assert "HTTP_X_FEATURE_FLAGS" not in seen, seen
    assert seen.get("HTTP_X_FEATURE_FLAGS_OMITTED") == "1"
    assert FORGED not in seen.values(), seen


def test_other_underscore_names_are_dropped_by_default(padded_proxy: Any) -> None:
    seen = environ_through(padded_proxy.port, [("X_Custom", "1"), ("X_Forwarded_For", "6.6.6.6")])
    assert "HTTP_X_CUSTOM" not in seen and "6.6.6.6" not in json.dumps(seen)


def test_reject_answers_400_naming_the_header(proxy_factory: Any, wsgi_origin: str) -> None:
    proxy = proxy_factory([wsgi_origin], config='[proxy]\nunderscore_headers = "reject"\n', flags=FLAGS)
    response = raw_exchange(proxy.port, raw_request("GET", "/x", [("X_Feature_Flags", FORGED)]))
    assert response.status == 400
    body = json.loads(response.body)
    assert body["error"] == "bad_request" and "X_Feature_Flags" in body["detail"]
    assert "underscore_headers" in body["detail"]
    assert environ_through(proxy.port, [("X-Plain", "1")])["HTTP_X_PLAIN"] == "1"


def test_pass_keeps_ordinary_names_but_never_the_controlled_ones(
    proxy_factory: Any, wsgi_origin: str
) -> None:
    proxy = proxy_factory([wsgi_origin], config='[proxy]\nunderscore_headers = "pass"\n', flags=FLAGS)
    headers = [
        ("X_Custom", "kept"),
        ("X_Feature_Flags", FORGED),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X_Request_Id", "forged-id"),
        ("Transfer_Encoding", "chunked"),
    ]
    seen = environ_through(proxy.port, headers)
    assert seen["HTTP_X_CUSTOM"] == "kept"
    assert seen["HTTP_X_FEATURE_FLAGS"] == '{"beta":false}'
    assert "6.6.6.6" not in seen.get("HTTP_X_FORWARDED_FOR", "")
    assert seen.get("HTTP_X_REQUEST_ID") != "forged-id"
    assert "HTTP_TRANSFER_ENCODING" not in seen


# --- the invariant, fuzzed: no spelling of a reserved name is forwarded, in any mode ---------------

FAMILY = ["x-feature-flags", "x-feature-flags-config", "x-feature-flags-omitted", "x-feature-flags-signature"]
RESERVED = FlagHeaders().is_reserved
# what the proxy sets or removes itself: RFC 9110 §7.6.1 hop-by-hop (the differential tests' list),
# forwarding headers, its own ids
CONTROLLED = frozenset(name.encode() for name in HOP_BY_HOP) | {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
    b"x-request-id",
    b"host",
    b"expect",
}


@st.composite
def spellings(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([*FAMILY, *(n.decode() for n in CONTROLLED if n != b"host")]))
    out = []
    for char in base:
        if char == "-":
            char = draw(st.sampled_from(["-", "_"]))
        elif draw(st.booleans()):
            char = char.upper()
        out.append(char)
    suffix = draw(st.sampled_from(["", "", "-keys", "_x", "-Extra"]))
    return ("".join(out) + suffix).encode()


def reads_as_reserved(name: bytes) -> bool:
    """How a WSGI/CGI origin reads a name: case-insensitive, ``_`` as ``-``."""
    dashed = name.lower().replace(b"_", b"-")
    return RESERVED(dashed) or dashed in CONTROLLED


@settings(max_examples=400, deadline=None)
@given(names=st.lists(spellings(), min_size=1, max_size=6), mode=st.sampled_from(["drop", "pass", "reject"]))
def test_no_spelling_of_a_reserved_name_is_forwarded(names: list[bytes], mode: str) -> None:
    rules = RequestRules(is_reserved=RESERVED, underscores=mode)
    headers = [(b"Host", b"a.example"), *((name, b"forged") for name in names)]
    lowered = [name.lower() for name, _ in headers]
    try:
        lines = rules.rewrite(headers, lowered, "10.0.0.1", b"1.1", b"o:80", False, b"rid", None)
    except BadRequest:
        assert mode == "reject" and any(b"_" in name for name in names)
        return
    for line in lines:
        name, _, value = line.partition(b": ")
        if value.rstrip(b"\r\n") == b"forged":
            assert not reads_as_reserved(name), line
