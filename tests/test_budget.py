"""The request-header budget: what reaches the origin is counted exactly and trimmed deterministically.

* ``FlagHeaders.fit`` on its own: trimming order, valid JSON, the Omitted count, the over-budget case,
  ``size`` equal to the wire bytes, and a hypothesis property over random flag sets and budgets.
* Byte-exact accounting at a raw origin (``RawOrigin`` records every head byte for byte): for many
  request shapes, a budget of exactly the measured head size S passes everything, S - 1 trims.
* 10,000 randomized requests through one proxy with 400 flags carrying large configs.
* The issue's "done when": 400 flags, default limits, a local Slack stand-in, admin evaluate.
* Pre-flight: a webhook / admin change that makes a route too big alerts before any traffic, and
  ``flagproxy budget`` prints the worst case per route and exits 1 when a route is over budget.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    LOCALHOST,
    PYTHON,
    REPO,
    OriginConnection,
    ProxyProcess,
    RawOrigin,
    RawResponse,
    RecordedRequest,
    clean_env,
    http_client,
    http_response,
    post_webhook,
    raw_exchange,
    read_response,
)

from proxy.alerts import Alert, Alerter
from proxy.config import AlertSettings, OriginSettings, Settings
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.header_fit import Fitted, FlagHeaders, line_size
from proxy.dataplane.preflight import worst_case
from proxy.dataplane.upstream import Origin
from proxy.engine import Flag, Served, compile_document, compile_flag, encode_json
from proxy.observers.budget_alerts import BudgetWatch, route_pattern
from proxy.store.base import Snapshot
from proxy.store.state import RawState

pytestmark = pytest.mark.timeout(120)

NAME = b"x-feature-flags"
CONFIG = b"x-feature-flags-config"
OMITTED = b"x-feature-flags-omitted"
FLAG_HEADERS = (NAME, CONFIG, OMITTED)
EMPTY_FLAGS_LINE = len(b"x-feature-flags: {}\r\n")
DEFAULT_BUDGET = 10240 - 512
TOKEN = "budget-admin-token"
SECRET = "budget-webhook-secret"


# --- an independent model of the flag headers ---------------------------------------------------------


def obj(items: Mapping[str, str]) -> str:
    """``{"key":json,...}`` from key → already-encoded JSON."""
    return "{" + ",".join(f"{encode_json(k)}:{v}" for k, v in items.items()) + "}"


def line(name: bytes, items: Mapping[str, str]) -> int:
    """Wire bytes of ``name: {...}\\r\\n``."""
    return len(name) + 4 + len(obj(items))


def wire(headers: Sequence[tuple[bytes, bytes]]) -> int:
    return len(b"".join(n + b": " + v + b"\r\n" for n, v in headers))


def sized_line(name: bytes, entry_sizes: Sequence[int]) -> int:
    """Wire bytes of ``name: {e1,e2,...}\\r\\n`` from the entries' sizes."""
    return len(name) + 4 + 2 + sum(entry_sizes) + max(0, len(entry_sizes) - 1)


class Expected:
    """Everything the origin should get for one set of applicable flags, before any trimming."""

    def __init__(self, resolved: Sequence[tuple[Flag, Served]]) -> None:
        ordered = sorted(resolved, key=lambda r: (r[0].priority, r[0].key))
        self.values = {f.key: s.value_json for f, s in resolved}  # key → value JSON
        self.configs = {f.key: s.config_json for f, s in resolved if s.config_json is not None}
        self.value_order = [f.key for f, _ in ordered]  # the drop order: (priority, key)
        self.config_order = [k for k in self.value_order if k in self.configs]
        self.parsed_values = {k: json.loads(v) for k, v in self.values.items()}
        self.parsed_configs = {k: json.loads(v) for k, v in self.configs.items()}
        self.value_entry = {k: len(encode_json(k)) + 1 + len(v) for k, v in self.values.items()}
        self.config_entry = {k: len(encode_json(k)) + 1 + len(v) for k, v in self.configs.items()}
        self.total = len(self.values)  # the Omitted count is of flags: at most one per flag
        self.full = line(NAME, self.values) + (line(CONFIG, self.configs) if self.configs else 0)
        # room the proxy keeps for the Omitted line while trimming (digits of the largest count)
        self.reserve = line_size(OMITTED, len(str(self.total)))


@dataclass
class Outcome:
    kind: str  # full | trimmed | over_budget
    omitted: int = 0
    dropped_values: int = 0
    dropped_configs: int = 0


def check_flag_headers(
    expected: Expected, headers: Sequence[tuple[bytes, bytes]], base: int, budget: int | None
) -> Outcome:
    """The flag headers a request carries, given ``base`` bytes of everything else and the budget.

    Used for the unit property (``base`` = 0, budget = available) and for every request recorded at
    the origin (``base`` = head bytes that are not flag header lines).
    """
    names = [n.lower() for n, _ in headers]
    assert len(set(names)) == len(names), f"a flag header was sent twice: {names}"
    got = {n.lower(): v for n, v in headers}
    assert set(got) <= set(FLAG_HEADERS)

    if budget is None or base + expected.full <= budget:  # everything fits: nothing dropped
        assert OMITTED not in got
        assert json.loads(got[NAME]) == expected.parsed_values
        if expected.configs:
            assert json.loads(got[CONFIG]) == expected.parsed_configs
        else:
            assert CONFIG not in got
        assert wire(headers) == expected.full
        return Outcome("full")

    minimal = base + EMPTY_FLAGS_LINE + expected.reserve
    if minimal > budget:  # over budget even without flags: no flag headers, only the count
        assert NAME not in got and CONFIG not in got, "flag headers sent for a request over budget"
        assert got[OMITTED] == str(expected.total).encode()
        return Outcome("over_budget", expected.total, len(expected.values), 0)

    assert base + wire(headers) <= budget, (base, wire(headers), budget)
    kept_values = json.loads(got[NAME])
    kept_configs = json.loads(got[CONFIG]) if CONFIG in got else {}
    assert CONFIG not in got or kept_configs, "an empty config object was sent"
    assert {k: expected.parsed_values[k] for k in kept_values} == kept_values
    assert {k: expected.parsed_configs[k] for k in kept_configs} == kept_configs
    dropped_values = expected.value_order[: len(expected.values) - len(kept_values)]
    dropped_configs = expected.config_order[: len(expected.configs) - len(kept_configs)]
    # what was dropped is exactly a prefix of the order: lowest (priority, key) first
    assert set(dropped_values) == set(expected.values) - set(kept_values)
    assert set(dropped_configs) == set(expected.configs) - set(kept_configs)
    assert not dropped_values or not kept_configs, "a value was dropped while a config was kept"
    # the count: flags that did not arrive whole (value left out, or value sent without its config)
    configs_of_sent = [k for k in dropped_configs if k in kept_values]
    omitted = len(dropped_values) + len(configs_of_sent)
    assert omitted > 0
    assert got[OMITTED] == str(omitted).encode()

    # ... and no more than needed: keeping the last dropped entry would not have fit
    value_sizes = [expected.value_entry[k] for k in kept_values]
    config_sizes = [expected.config_entry[k] for k in kept_configs]
    if dropped_values:
        value_sizes.append(expected.value_entry[dropped_values[-1]])
    else:
        config_sizes.append(expected.config_entry[dropped_configs[-1]])
    restored = sized_line(NAME, value_sizes) + (sized_line(CONFIG, config_sizes) if config_sizes else 0)
    assert base + restored + expected.reserve > budget, "an entry was dropped that fitted"
    return Outcome("trimmed", omitted, len(dropped_values), len(configs_of_sent))


# --- flags for unit tests ---------------------------------------------------------------------------

NO_CONFIG: Any = object()


def make_flag(
    key: str,
    priority: int = 0,
    value: str | None = None,
    config: Any = NO_CONFIG,
    routes: Sequence[str] | None = None,
) -> Flag:
    """A flag that always serves one outcome: ``true`` or the variant ``value`` (with ``config``)."""
    definition: dict[str, Any] = {"priority": priority}
    if value is not None or config is not NO_CONFIG:
        variant: dict[str, Any] = {"weight": 1}
        if config is not NO_CONFIG:
            variant["config"] = config
        definition["variants"] = {value if value is not None else "on": variant}
    if routes is not None:
        definition["routes"] = list(routes)
    return compile_flag(key, definition)


def resolve(flags: Sequence[Flag], path: str = "/") -> list[tuple[Flag, Served]]:
    return [(f, f.evaluate({"key": "u", "path": path})) for f in flags]


def check_fit(resolved: Sequence[tuple[Flag, Served]], available: int | None) -> tuple[Fitted, Outcome]:
    fitted = FlagHeaders().fit(resolved, available)
    assert fitted.size == wire(fitted.headers)
    outcome = check_flag_headers(Expected(resolved), fitted.headers, 0, available)
    assert fitted.over_budget == (outcome.kind == "over_budget")
    assert fitted.omitted == outcome.omitted
    assert len(fitted.omitted_values) == outcome.dropped_values
    assert len(fitted.omitted_configs) == outcome.dropped_configs
    if outcome.kind == "trimmed":
        got = dict(fitted.headers)
        assert set(fitted.omitted_values) == {f.key for f, _ in resolved} - set(json.loads(got[NAME]))
        kept_configs = set(json.loads(got[CONFIG])) if CONFIG in got else set()
        with_config = {f.key for f, s in resolved if s.config_json is not None}
        sent = set(json.loads(got[NAME]))
        assert set(fitted.omitted_configs) == (with_config & sent) - kept_configs
    return fitted, outcome


# --- 1. FlagHeaders.fit ------------------------------------------------------------------------------

PAD = "x" * 40
ORDER_FLAGS = [
    make_flag("alpha", 5, "a", {"pad": PAD}),
    make_flag("bravo", 1, "b", {"pad": PAD}),
    make_flag("charlie", 1, "c", {"pad": PAD}),
    make_flag("delta", 0),  # a boolean: a value, no config
    make_flag("echo", 9, "e", {"pad": PAD}),
    make_flag("aardvark", 1, "z"),  # a variant without config, same priority as bravo/charlie
]
CONFIG_DROP_ORDER = ["bravo", "charlie", "alpha", "echo"]
VALUE_DROP_ORDER = ["delta", "aardvark", "bravo", "charlie", "alpha", "echo"]


def test_everything_fits_exactly_at_the_full_size() -> None:
    resolved = resolve(ORDER_FLAGS)
    full = FlagHeaders().fit(resolved, None)
    assert full.headers == FlagHeaders().encode(resolved)
    assert full.size == wire(full.headers) == Expected(resolved).full
    fitted, outcome = check_fit(resolved, full.size)
    assert (outcome.kind, fitted.headers) == ("full", full.headers)
    _, outcome = check_fit(resolved, full.size - 1)
    assert outcome.kind == "trimmed"


def test_trimming_order_configs_first_lowest_priority_first_ties_by_key() -> None:
    resolved = resolve(ORDER_FLAGS)
    full = FlagHeaders().fit(resolved, None).size
    seen: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for available in range(full, -2, -1):
        fitted, _ = check_fit(resolved, available)
        got = dict(fitted.headers)
        kept_configs = set(json.loads(got[CONFIG])) if CONFIG in got else set()
        not_sent = [k for k in CONFIG_DROP_ORDER if k not in kept_configs]
        dropped_configs = sorted(not_sent, key=CONFIG_DROP_ORDER.index)
        dropped_values = sorted(fitted.omitted_values, key=VALUE_DROP_ORDER.index)
        assert dropped_configs == CONFIG_DROP_ORDER[: len(dropped_configs)]
        assert dropped_values == VALUE_DROP_ORDER[: len(dropped_values)]
        if dropped_values:
            assert dropped_configs == CONFIG_DROP_ORDER
        state = (tuple(dropped_configs), tuple(dropped_values))
        if not seen or seen[-1] != state:
            seen.append(state)
    # every stage was reached, one entry at a time, down to "over budget": everything omitted
    stages = [(len(c), len(v)) for c, v in seen]
    assert stages[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
    assert stages[-1] == (4, 6)
    assert fitted.over_budget and fitted.headers == [(OMITTED, b"6")]  # six flags, none sent


def test_both_headers_stay_valid_json_with_awkward_keys_and_values() -> None:
    flags = [
        make_flag('quo"te', 0, 'va"r\\', {"s": 'a"b\\c\n', "u": "é€🚀"}),
        make_flag("ünï", 1, "日本", {"n": None, "l": [1, {"x": []}]}),
        make_flag("plain", 2, "v", "just a string"),
        make_flag("nullcfg", 3, "v", None),
    ]
    resolved = resolve(flags)
    full = FlagHeaders().fit(resolved, None)
    for _, value in full.headers:
        assert value.isascii()
    for available in range(full.size, -1, -1):
        check_fit(resolved, available)


def test_over_budget_sends_only_the_count() -> None:
    resolved = resolve(ORDER_FLAGS)
    expected = Expected(resolved)
    minimal = EMPTY_FLAGS_LINE + expected.reserve
    fitted, outcome = check_fit(resolved, minimal)
    assert outcome.kind == "trimmed" and fitted.headers[0] == (NAME, b"{}")
    assert fitted.omitted == expected.total == 6  # every flag, once
    for available in (minimal - 1, 0, -500):
        fitted = FlagHeaders().fit(resolved, available)
        assert fitted.over_budget
        assert fitted.headers == [(OMITTED, b"6")]
        assert fitted.size == len(b"x-feature-flags-omitted: 6\r\n")
        assert sorted(fitted.omitted_values) == sorted(f.key for f in ORDER_FLAGS)
        assert fitted.omitted_configs == []  # no value sent: nothing counts twice


def test_no_flags_at_all() -> None:
    fitted = FlagHeaders().fit([], 1000)
    assert (fitted.headers, fitted.size, fitted.omitted) == ([(NAME, b"{}")], EMPTY_FLAGS_LINE, 0)


def test_custom_header_names_are_counted() -> None:
    encoder = FlagHeaders("X-Flags", "X-Flags-Cfg")
    resolved = resolve(ORDER_FLAGS)
    full = encoder.fit(resolved, None)
    assert [n for n, _ in full.headers] == [b"x-flags", b"x-flags-cfg"]
    trimmed = encoder.fit(resolved, full.size - 1)
    assert trimmed.size == wire(trimmed.headers) <= full.size - 1
    assert trimmed.headers[-1] == (b"x-flags-omitted", b"1")


# hypothesis: random flag sets, priorities, configs and available sizes

JSON_LEAF = st.none() | st.booleans() | st.integers(-(10**6), 10**12) | st.text(max_size=12)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
CONFIGS = st.one_of(
    st.just(NO_CONFIG),
    JSON_VALUE,
    st.integers(0, 300).map(lambda n: {"pad": "p" * n}),
)
KEYS = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=10)
FLAG_SPECS = st.tuples(st.integers(-3, 3), st.none() | st.text(min_size=1, max_size=10), CONFIGS)


def fit_property(specs: dict[str, tuple[int, str | None, Any]], data: st.DataObject) -> None:
    flags = [make_flag(key, priority, value, config) for key, (priority, value, config) in specs.items()]
    resolved = resolve(flags)
    full = FlagHeaders().fit(resolved, None).size
    available = data.draw(st.one_of(st.none(), st.integers(-5, full + 5), st.integers(full - 40, full)))
    fitted, outcome = check_fit(resolved, available)
    if available is not None and not fitted.over_budget:
        assert fitted.size <= available
    if outcome.kind == "over_budget":
        assert available is not None and available < EMPTY_FLAGS_LINE + Expected(resolved).reserve


FIT_SPECS = {"specs": st.dictionaries(KEYS, FLAG_SPECS, max_size=25), "data": st.data()}
# make test: 100 examples; make test-slow: 1,000
test_fit_property = settings(max_examples=100, deadline=None, database=None)(given(**FIT_SPECS)(fit_property))
test_fit_property_deeply = pytest.mark.slow(
    settings(max_examples=1000, deadline=None, database=None)(given(**FIT_SPECS)(fit_property))
)


# --- route patterns and origin labels in alerts --------------------------------------------------------


def test_route_pattern_is_the_longest_glob_that_matched_not_the_longest_of_the_flag() -> None:
    multi = make_flag("multi", routes=["/a/**", "/a-very-long-unrelated-pattern/**"])
    narrow = make_flag("narrow", routes=["/a/b/*"])
    everywhere = make_flag("everywhere")
    for path, pattern in [
        ("/a/x", "/a/**"),
        ("/a/b/c", "/a/b/*"),
        ("/a-very-long-unrelated-pattern/q", "/a-very-long-unrelated-pattern/**"),
        ("/elsewhere", "/api"),
    ]:
        resolved = [(f, s) for f, s in resolve([multi, narrow, everywhere], path) if f.applies_to(path)]
        assert route_pattern("/api", path, resolved) == pattern, path


def test_alert_origin_label_has_no_credentials_and_matches_prefixes_with_a_slash() -> None:
    origins = (
        OriginSettings(url="http://user:s3cret@127.0.0.1:9/base", prefix="/api/"),
        OriginSettings(url="http://127.0.0.1:8", prefix="/"),
    )
    settings_ = Settings(origins=origins)
    alerts: list[Alert] = []

    class Recorder(Alerter):
        def notify(self, alert: Alert) -> bool:
            alerts.append(alert)
            return True

    watch = BudgetWatch(settings_, Recorder(AlertSettings()), FlagHeaders())
    big = make_flag("big", 0, "v", {"pad": "x" * 20000}, routes=["/api/big/**"])
    origin = Origin.from_settings(origins[0], settings_)
    resolved = resolve([big], "/api/big/1")
    fitted = FlagHeaders().fit(resolved, origin.budget - 100)
    exchange = Exchange("GET", "/api/big/1", None, "rid-1", origin=origin, resolved=resolved, fitted=fitted)
    exchange.head_bytes = 100 + fitted.size
    watch.observe(exchange)
    watch.preflight(Snapshot.build(1, {"big": big}, RawState()))
    assert [(a.condition, a.origin, a.route) for a in alerts] == [
        ("trimmed", "http://127.0.0.1:9", "/api/big/**"),
        ("preflight", "http://127.0.0.1:9", "/api/big/**"),  # only the origin serving /api/big/**
    ]
    assert alerts[0].request_id == "rid-1"
    assert not any("s3cret" in json.dumps(a.message()) for a in alerts)


def test_preflight_worst_case_covers_paths_matched_by_overlapping_globs() -> None:
    outer = make_flag("outer", 0, "v", {"pad": "o" * 5000}, routes=["/a/**"])
    inner = make_flag("inner", 0, "v", {"pad": "i" * 5000}, routes=["/a/b/**"])
    path = "/a/b/c"
    assert outer.applies_to(path) and inner.applies_to(path)
    real = 1500 + FlagHeaders().fit(resolve([inner, outer], path), None).size
    assert real > DEFAULT_BUDGET  # a request there is trimmed ...
    rows = worst_case(Settings(), {"outer": outer, "inner": inner})
    assert max(r.worst_bytes for r in rows) >= real  # ... so pre-flight must see it coming


# --- raw HTTP helpers ---------------------------------------------------------------------------------


def build(
    method: str, target: str, headers: Sequence[tuple[str, str | bytes]] = (), body: bytes = b""
) -> bytes:
    """Exact request bytes; str header values are sent as UTF-8, bytes as they are."""
    out = [f"{method} {target} HTTP/1.1\r\n".encode()]
    for name, value in headers:
        out.append(name.encode() + b": " + (value.encode() if isinstance(value, str) else value) + b"\r\n")
    return b"".join(out) + b"\r\n" + body


async def answer(request: RecordedRequest, conn: OriginConnection) -> None:
    """200 "ok", without a body for HEAD (the connection stays usable)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    await conn.send(head if request.method == "HEAD" else head + b"ok")


class KeepAliveClient:
    """One raw keep-alive connection to the proxy, reopened when the proxy closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def send(self, request: bytes) -> RawResponse:
        method = request.split(b" ", 1)[0].decode()
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = socket.create_connection((LOCALHOST, self.port), timeout=10)
            try:
                self.sock.sendall(request)
                response = read_response(self.sock, method)
            except (ConnectionError, OSError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if any(v.lower() == "close" for v in response.values("connection")):
                self.close()
            return response
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def flag_lines(request: RecordedRequest) -> tuple[list[tuple[bytes, bytes]], int]:
    """The flag headers the origin got and the bytes of their lines (each checked to be in the head)."""
    found = [(n, v) for n, v in request.headers if n.lower() in FLAG_HEADERS]
    for name, value in found:
        assert b"\r\n" + name + b": " + value + b"\r\n" in request.head
    return [(n.lower(), v) for n, v in found], wire(found)  # names compared in lower case


def toml_origins(entries: Sequence[tuple[str, str, int | None, int | None]]) -> str:
    out = []
    for prefix, url, limit, reserve in entries:
        out += ["[[origins]]", f'prefix = "{prefix}"', f'url = "{url}"']
        if limit is not None:
            out.append(f"header_limit_bytes = {limit}")
        if reserve is not None:
            out.append(f"header_reserve_bytes = {reserve}")
        out.append("")
    return "\n".join(out)


# --- 2. byte-exact accounting -----------------------------------------------------------------------

EXACT_FLAGS: dict[str, Any] = {
    "flags": {
        **{
            f"exact-{i:02d}": {
                "priority": (i * 7) % 12,
                "variants": {f"variant-{i}": {"weight": 1, "config": {"pad": "p" * (60 + i), "i": i}}},
            }
            for i in range(12)
        },
        "exact-bool-on": {"priority": 3},
        "exact-bool-off": {"enabled": False, "priority": -1},
    }
}
FIRST_CONFIG_DROPPED = "exact-00"  # priority 0, the lowest of the flags with a config
EXACT_EXPECTED = Expected(resolve(list(compile_document(EXACT_FLAGS).values())))
USER = [("X-User-Id", "exact-user"), ("X-Request-Id", "budget-test")]

SHAPES: dict[str, Callable[[str], bytes]] = {
    "get": lambda p: build("GET", p, [("Host", "test.example"), *USER]),
    "head": lambda p: build("HEAD", p, [("Host", "test.example"), *USER]),
    "options": lambda p: build("OPTIONS", p, [("Host", "test.example"), *USER]),
    "post_content_length": lambda p: build(
        "POST",
        p,
        [("Host", "test.example"), *USER, ("Content-Type", "text/plain"), ("Content-Length", "11")],
        b"hello world",
    ),
    "post_chunked": lambda p: build(
        "POST",
        p,
        [("Host", "test.example"), *USER, ("Transfer-Encoding", "chunked")],
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    ),
    "delete_without_body": lambda p: build("DELETE", p, [("Host", "test.example"), *USER]),
    "put_without_body": lambda p: build("PUT", p, [("Host", "test.example"), *USER]),
    "custom_method_without_body": lambda p: build("PURGE", p, [("Host", "test.example"), *USER]),
    "get_with_chunked_body": lambda p: build(
        "GET",
        p,
        [("Host", "test.example"), *USER, ("Transfer-Encoding", "chunked")],
        b"3\r\nabc\r\n0\r\n\r\n",
    ),
    "patch_content_length_0": lambda p: build(
        "PATCH", p, [("Host", "test.example"), *USER, ("Content-Length", "0")]
    ),
    "utf8_header_value": lambda p: build(
        "GET", p, [("Host", "test.example"), *USER, ("X-Note", "café € 日本 🚀"), ("X-Name", "Zoë")]
    ),
    "long_query": lambda p: build(
        "GET", p + "?" + "&".join(f"q{i}=a%20b~{i}" for i in range(300)), [("Host", "test.example"), *USER]
    ),
    "many_client_headers": lambda p: build(
        "GET", p, [("Host", "test.example"), *USER, *((f"X-Client-{i}", "v" * (i % 17)) for i in range(90))]
    ),
    "trusted_forwarding": lambda p: build(
        "GET",
        p,
        [
            ("Host", "test.example"),
            *USER,
            ("X-Forwarded-For", "203.0.113.7, 198.51.100.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "shop.example"),
            ("Forwarded", "for=203.0.113.7;proto=https"),
            ("Via", "1.1 cdn-edge"),
        ],
    ),
    "hop_by_hop_and_te_trailers": lambda p: build(
        "GET",
        p,
        [
            ("Host", "test.example"),
            *USER,
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "dropped"),
            ("TE", "trailers"),
            ("Keep-Alive", "timeout=5"),
        ],
    ),
    "spoofed_flag_headers": lambda p: build(
        "GET",
        p,
        [
            ("Host", "test.example"),
            *USER,
            ("X-Feature-Flags", '{"evil":true}'),
            ("X-Feature-Flags-Omitted", "0"),
            ("X-Feature-Flags-Config", "{}"),
        ],
    ),
    "http_1_0_without_host": lambda p: build("GET", p, USER).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
}
SHAPE_NAMES = list(SHAPES)


def shape_path(tag: str, index: int) -> str:
    """Paths of the same length for every tag, so one shape has the same head size everywhere."""
    return f"/{tag}{index:02d}/shape"


@dataclass
class Measured:
    sizes: dict[str, int]  # shape → S: head bytes the origin got with all flags
    heads: dict[str, bytes]


@pytest.fixture(scope="module")
def exact_origin(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    origin = origin_factory()
    origin.default = answer
    return origin


def send_shape(port: int, name: str, path: str) -> RawResponse:
    response = raw_exchange(port, SHAPES[name](path))
    assert response.status == 200, (name, response.status, response.body)
    return response


@pytest.fixture(scope="module")
def measured(exact_origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> Measured:
    """Every shape through a proxy with a huge budget: the head size S with all flags."""
    env = {
        "FLAGPROXY_HEADER_LIMIT_BYTES": "1000000",
        "FLAGPROXY_HEADER_RESERVE_BYTES": "0",
        "FLAGPROXY_PROXY_TRUSTED_PROXIES": "127.0.0.0/8",
    }
    proxy = proxy_factory([exact_origin.url], flags=EXACT_FLAGS, env=env)
    sizes, heads = {}, {}
    for index, name in enumerate(SHAPE_NAMES):
        path = shape_path("m", index)
        send_shape(proxy.port, name, path)
        seen = exact_origin.only_request_to(path)
        found, _ = flag_lines(seen)
        assert check_flag_headers(EXACT_EXPECTED, found, 0, None).kind == "full"
        sizes[name], heads[name] = len(seen.head), seen.head
    print(f"\nhead sizes S with all flags: {sizes}")
    return Measured(sizes, heads)


@pytest.fixture(scope="module")
def exact_proxy(
    measured: Measured, exact_origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> ProxyProcess:
    """One proxy, two origins per shape: budget exactly S ("/eNN") and S - 1 ("/tNN")."""
    entries = []
    for index, name in enumerate(SHAPE_NAMES):
        size = measured.sizes[name]
        entries.append((shape_path("e", index).rsplit("/", 1)[0], exact_origin.url, size, 0))
        entries.append((shape_path("t", index).rsplit("/", 1)[0], exact_origin.url, size - 1, 0))
    # byte-exact sizes: no Omitted-Keys line (its own tests are in test_required_flags.py)
    config = '[proxy]\ntrusted_proxies = ["127.0.0.0/8"]\n\n[header]\nomitted_keys = false\n\n'
    return proxy_factory(config=config + toml_origins(entries), flags=EXACT_FLAGS)


def test_measured_shapes_are_framed_as_expected(measured: Measured) -> None:
    heads = measured.heads
    for shape in ("delete_without_body", "put_without_body", "custom_method_without_body", "get"):
        assert b"content-length" not in heads[shape].lower(), shape  # nothing the client did not send
    assert b"\r\nContent-Length: 0\r\n" not in heads["options"]
    assert b"\r\nTransfer-Encoding: chunked\r\n" in heads["get_with_chunked_body"]
    assert b"\r\nTransfer-Encoding: chunked\r\n" in heads["post_chunked"]
    assert b"\r\nContent-Length: 11\r\n" in heads["post_content_length"]  # the client's spelling
    assert "café € 日本 🚀".encode() in heads["utf8_header_value"]
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in heads["get"]
    assert b"\r\nX-Forwarded-For: 203.0.113.7, 198.51.100.2, 127.0.0.1\r\n" in heads["trusted_forwarding"]
    assert b"\r\nTE: trailers\r\nConnection: TE\r\n" in heads["hop_by_hop_and_te_trailers"]
    assert b"x-hop" not in heads["hop_by_hop_and_te_trailers"].lower()
    assert b"evil" not in heads["spoofed_flag_headers"]
    assert len(heads["long_query"]) > 4000
    assert len(set(measured.sizes.values())) > 8  # the shapes really differ in size


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_budget_of_exactly_the_head_size_fits_and_one_byte_less_trims(
    name: str, measured: Measured, exact_origin: RawOrigin, exact_proxy: ProxyProcess
) -> None:
    index = SHAPE_NAMES.index(name)
    size = measured.sizes[name]

    exact_path = shape_path("e", index)
    send_shape(exact_proxy.port, name, exact_path)
    exact = exact_origin.only_request_to(exact_path)
    assert exact.value("X-Feature-Flags-Omitted") is None
    assert len(exact.head) == size
    # byte for byte what the unlimited proxy sent, apart from the (same length) prefix
    assert exact.head.replace(exact_path.encode(), shape_path("m", index).encode()) == measured.heads[name]

    tight_path = shape_path("t", index)
    send_shape(exact_proxy.port, name, tight_path)
    tight = exact_origin.only_request_to(tight_path)
    found, _ = flag_lines(tight)
    outcome = check_flag_headers(EXACT_EXPECTED, found, len(tight.head) - wire(found), size - 1)
    assert (outcome.kind, outcome.omitted, outcome.dropped_configs) == ("trimmed", 1, 1)
    assert FIRST_CONFIG_DROPPED not in json.loads(tight.value("X-Feature-Flags-Config") or "{}")
    # exactly one config entry (and its comma) left, the count line came in
    dropped = len(encode_json(FIRST_CONFIG_DROPPED)) + 1 + len(EXACT_EXPECTED.configs[FIRST_CONFIG_DROPPED])
    assert len(tight.head) == size - (dropped + 1) + len(b"x-feature-flags-omitted: 1\r\n")
    assert len(tight.head) <= size - 1


# --- 3. 10,000 randomized requests ------------------------------------------------------------------

RANDOM_SEED = 20240611
RANDOM_ROUTES = ["/r/**", "/wide/r/**", "/mid/r/**"]


def random_flags() -> dict[str, Any]:
    rng = random.Random(RANDOM_SEED)
    flags: dict[str, Any] = {}
    for i in range(400):
        definition: dict[str, Any] = {"priority": rng.randint(-20, 20)}
        kind = rng.random()
        if kind < 0.15:
            definition["enabled"] = rng.random() < 0.5  # boolean, no config
        else:
            size = rng.randint(20, 200)
            definition["variants"] = {
                f"variant-{i}-{'v' * rng.randint(0, 12)}": {
                    "weight": 1,
                    "config": {"blob": "c" * size, "n": i, "tags": ["a", "é"][: rng.randint(0, 2)]},
                }
            }
        if i % 8 == 0:
            definition["routes"] = RANDOM_ROUTES
        flags[f"random-{i:03d}-{rng.choice(['a', 'bb', 'ccc'])}"] = definition
    return {"flags": flags}


RANDOM_FLAGS = random_flags()
RANDOM_COMPILED = compile_document(RANDOM_FLAGS)
ROUTED_SAMPLE = next(f for f in RANDOM_COMPILED.values() if f.routes)
RANDOM_EXPECTED = {
    routed: Expected(
        [(f, f.evaluate({"key": "x"})) for f in RANDOM_COMPILED.values() if routed or f.routes is None]
    )
    for routed in (False, True)
}
ROOT_BUDGET = 8192 - 192  # from FLAGPROXY_HEADER_LIMIT_BYTES / _RESERVE_BYTES
# per origin: "/wide" where everything fits for small requests, "/mid" where only the values do
WIDE_BUDGET = RANDOM_EXPECTED[True].full + 3000
MID_BUDGET = line(NAME, RANDOM_EXPECTED[True].values) + 3000
BUDGETS = {"": ROOT_BUDGET, "/wide": WIDE_BUDGET, "/mid": MID_BUDGET}

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PURGE"]
# no ".." segments: they change the route (tests/test_paths.py covers them)
SEGMENT_CHOICES = ["a", "xyz", "X-1_0.~", "!$&'()*+,;=:@", "", "%41", "%2F", "r%2Fx", "%C3%A9", "%25"]
QUERY_CHARS = b"abcxyz019-._~!$&'()*+,;=:@/?%"
VALUE_CHARS = bytes(range(0x21, 0x7F)) + b" \t"
UTF8_CHARS = "aé€日🚀 z"
BIG_HEADER = [0] * 6 + [5000, 7800, 9000, 14000]


def table(alphabet: bytes) -> bytes:
    """A ``bytes.translate`` table mapping every byte onto ``alphabet`` (fast random text)."""
    return bytes(alphabet[i % len(alphabet)] for i in range(256))


QUERY_TABLE, VALUE_TABLE = table(QUERY_CHARS), table(VALUE_CHARS)
UTF8_TABLE = {i: UTF8_CHARS[i % len(UTF8_CHARS)] for i in range(256)}

# What hypothesis chooses per request; the bulk contents come from a drawn seed (cheap to generate).
REQUEST_SPECS = st.tuples(
    st.sampled_from(METHODS),
    st.sampled_from(list(BUDGETS)),  # origin prefix
    st.booleans(),  # under a routed path
    st.lists(st.tuples(st.sampled_from(["ascii", "utf8"]), st.integers(0, 2500)), max_size=4),
    st.sampled_from(BIG_HEADER),
    st.sampled_from(["none", "length", "chunked", "empty-length"]),
    st.none() | st.integers(0, 3000),  # query length
    st.booleans(),  # spoofed flag headers from the client
    st.integers(0, 2**32),  # seed for path segments, header values, bodies, user
)


def header_value(rng: random.Random, kind: str, size: int) -> bytes:
    raw = rng.randbytes(size)
    if kind == "ascii":
        value = raw.translate(VALUE_TABLE)
    else:  # non-UTF-8 values are refused before the budget matters (tests/test_forward.py)
        value = raw[: size // 2].decode("latin-1").translate(UTF8_TABLE).encode()
    return value.strip(b" \t")


def random_request(spec: tuple[Any, ...], probe: int) -> tuple[bytes, str]:
    """(request bytes, path) for one drawn spec; ``X-Probe`` identifies it at the origin."""
    method, prefix, routed, header_specs, big, body_kind, query, spoof, seed = spec
    rng = random.Random(seed)
    segments = rng.choices(SEGMENT_CHOICES, k=rng.randint(0, 4))
    path = prefix + ("/r" if routed else "") + "/" + "/".join(segments)
    target = path
    if query is not None:
        target += "?" + rng.randbytes(query).translate(QUERY_TABLE).decode()
    headers: list[tuple[str, str | bytes]] = [
        ("Host", "random.example"),
        ("X-Probe", str(probe)),
        ("X-User-Id", f"user-{rng.randint(0, 30)}"),
    ]
    for i, (kind, size) in enumerate(header_specs):
        headers.append((f"X-R{i}-{kind}", header_value(rng, kind, size)))
    if big:
        headers.append(("Cookie", "big=" + "b" * big))
    if spoof:
        headers += [("X-Feature-Flags", '{"spoofed":true}'), ("X-Feature-Flags-Omitted", "999")]
    body = b""
    data = rng.randbytes(rng.randint(0, 2000))
    if body_kind == "length":
        body = data
        headers.append(("Content-Length", str(len(body))))
    elif body_kind == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n"
    elif body_kind == "empty-length":
        headers.append(("Content-Length", "0"))
    return build(method, target, headers, body), path


@pytest.fixture(scope="module")
def random_origin(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    origin = origin_factory()
    origin.default = answer
    return origin


@pytest.fixture(scope="module")
def random_proxy(random_origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    config = toml_origins(
        [
            ("/", random_origin.url, None, None),
            ("/wide", random_origin.url, WIDE_BUDGET, 0),
            ("/mid", random_origin.url, MID_BUDGET, 0),
        ]
    )
    env = {"FLAGPROXY_HEADER_LIMIT_BYTES": "8192", "FLAGPROXY_HEADER_RESERVE_BYTES": "192"}
    return proxy_factory(config=config, flags=RANDOM_FLAGS, env=env)


@pytest.mark.slow  # make test-slow
def test_ten_thousand_random_requests_never_exceed_the_budget(
    random_origin: RawOrigin, random_proxy: ProxyProcess
) -> None:
    batch_size, batches = 25, 400
    local = threading.local()
    clients: list[KeepAliveClient] = []
    lock = threading.Lock()

    def client() -> KeepAliveClient:
        if getattr(local, "client", None) is None:
            local.client = KeepAliveClient(random_proxy.port)
            with lock:
                clients.append(local.client)
        return local.client

    def send(request: bytes) -> int:
        return client().send(request).status

    probes = iter(range(10**9))
    tally: dict[str, int] = {}
    counts = {"requests": 0, "omitted": 0, "max_head": 0, "over_budget_max_head": 0}

    @settings(
        max_examples=batches,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(specs=st.lists(REQUEST_SPECS, min_size=batch_size, max_size=batch_size))
    def run(specs: list[tuple[Any, ...]]) -> None:
        requests = {}
        for spec in specs:
            probe = next(probes)
            requests[str(probe)] = (*random_request(spec, probe), spec[1])
        statuses = list(pool.map(send, [r for r, _, _ in requests.values()]))
        assert statuses == [200] * len(statuses)
        with random_origin.changed:
            recorded, random_origin.requests[:] = list(random_origin.requests), []
        assert len(recorded) == len(requests)
        for seen in recorded:
            _, path, prefix = requests[seen.value("X-Probe") or ""]
            decoded = re.sub("/+", "/", unquote(path))  # as routing reads it: slashes merged
            expected = RANDOM_EXPECTED[ROUTED_SAMPLE.applies_to(decoded)]
            found, flag_bytes = flag_lines(seen)
            outcome = check_flag_headers(expected, found, len(seen.head) - flag_bytes, BUDGETS[prefix])
            tally[f"{prefix or '/'} {outcome.kind}"] = tally.get(f"{prefix or '/'} {outcome.kind}", 0) + 1
            counts["requests"] += 1
            counts["omitted"] += outcome.omitted
            key = "over_budget_max_head" if outcome.kind == "over_budget" else "max_head"
            counts[key] = max(counts[key], len(seen.head))

    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        try:
            run()
        finally:
            for c in clients:
                c.close()
        elapsed = time.monotonic() - started
    print(f"\nrandomized: {counts} in {elapsed:.1f} s; outcomes {dict(sorted(tally.items()))}")
    assert counts["requests"] >= 10_000
    # every regime was exercised on every origin it can occur on
    for name in ("/ trimmed", "/ over_budget", "/wide full", "/wide trimmed", "/mid trimmed"):
        assert tally.get(name, 0) >= 20, (name, tally)
    assert counts["max_head"] <= max(BUDGETS.values())


# --- 4. the issue's "done when": 400 flags, default limits, Slack, admin evaluate ---------------------


def many_flags() -> dict[str, Any]:
    rng = random.Random(400)
    flags: dict[str, Any] = {}
    for i in range(380):
        flags[f"big-{i:03d}"] = {
            "priority": rng.randint(-10, 10),
            "routes": ["/big/**"],
            "variants": {f"v{i}": {"weight": 1, "config": {"blob": "b" * rng.randint(150, 400), "i": i}}},
        }
    for i in range(15):
        flags[f"near-{i:02d}"] = {
            "priority": i,
            "routes": ["/near/**"],
            "variants": {f"n{i}": {"weight": 1, "config": {"blob": "n" * 500}}},
        }
    for i in range(5):
        flags[f"global-{i}"] = {"enabled": i % 2 == 0}
    return {"flags": flags}


MANY_FLAGS = many_flags()
MANY_COMPILED = compile_document(MANY_FLAGS)


def many_expected(path: str) -> Expected:
    return Expected([(f, f.evaluate({"key": "x"})) for f in MANY_COMPILED.values() if f.applies_to(path)])


def slack_messages(slack: RawOrigin, path: str = "/hook") -> list[dict[str, Any]]:
    return [json.loads(r.body or b"") for r in slack.requests_to(path)]


def condition_of(message: dict[str, Any]) -> str:
    fields = message["blocks"][1]["fields"]
    return next(f["text"].split("\n", 1)[1] for f in fields if f["text"].startswith("*Condition*"))


def route_of(message: dict[str, Any]) -> str:
    fields = message["blocks"][1]["fields"]
    return next(f["text"].split("\n", 1)[1].strip("`") for f in fields if f["text"].startswith("*Route*"))


def wait_for_messages(slack: RawOrigin, count: int, path: str = "/hook") -> list[dict[str, Any]]:
    assert slack.wait_until(lambda o: len(o.requests_to(path)) >= count, timeout=15), slack_messages(
        slack, path
    )
    return slack_messages(slack, path)


@pytest.fixture(scope="module")
def slack(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    """A local stand-in for the Slack incoming webhook: records posts, answers 200 "ok"."""
    server = origin_factory()
    server.default = http_response(200, [("Content-Type", "text/plain")], b"ok")
    return server


def test_many_flags_default_limits_one_alert_per_condition(
    origin_factory: Callable[..., RawOrigin], slack: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    origin = origin_factory()
    origin.default = answer
    env = {
        "FLAGPROXY_ALERTS_SLACK_WEBHOOK_URL": f"{slack.url}/hook",
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
    }
    proxy = proxy_factory([origin.url], flags=MANY_FLAGS, env=env)
    client = KeepAliveClient(proxy.port)

    def get(path: str, rid: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        headers = [("Host", "shop.example"), ("X-User-Id", "u-1"), ("X-Request-Id", rid), *extra]
        assert client.send(build("GET", path, headers)).status == 200

    try:
        for i in range(300):
            get(f"/big/item-{i:03d}?page={i}", f"big-{i:03d}")
        for i in range(50):
            get(f"/near/item-{i:02d}", f"near-{i:02d}")
        for i in range(20):
            get(f"/plain/item-{i:02d}", f"plain-{i:02d}")
        for i in range(5):
            get(f"/plain/huge-{i}", f"<!channel> huge-{i}", [("Cookie", "c=" + "z" * 10000)])
        # the sentinel: a new condition last; once it arrives, everything queued before it was sent
        get("/near/huge", "sentinel", [("Cookie", "c=" + "z" * 10000)])
        messages = wait_for_messages(slack, 6)
    finally:
        client.close()

    # what the origin got: never more than the budget, unless over it without any flag
    trimmed = over = 0
    for seen in origin.requests:
        path = seen.path.decode()
        found, flag_bytes = flag_lines(seen)
        outcome = check_flag_headers(many_expected(path), found, len(seen.head) - flag_bytes, DEFAULT_BUDGET)
        if outcome.kind == "over_budget":
            over += 1
            assert len(seen.head) > 10000 and seen.value("X-Feature-Flags") is None
        else:
            assert len(seen.head) <= DEFAULT_BUDGET
        if path.startswith("/big/"):
            assert outcome.kind == "trimmed" and int(seen.value("X-Feature-Flags-Omitted") or 0) > 300
            trimmed += 1
        elif path.startswith("/near/item"):
            assert outcome.kind == "full"
            assert len(seen.head) >= 0.8 * DEFAULT_BUDGET  # near the limit, not over it
        elif path.startswith("/plain/item"):
            assert outcome.kind == "full" and len(seen.head) < 0.8 * DEFAULT_BUDGET
    assert (len(origin.requests), trimmed, over) == (376, 300, 6)
    big_heads = [len(r.head) for r in origin.requests if r.path.startswith(b"/big/")]
    big_omitted = [
        int(r.value("X-Feature-Flags-Omitted") or 0) for r in origin.requests if r.path.startswith(b"/big/")
    ]
    near_heads = [len(r.head) for r in origin.requests if r.path.startswith(b"/near/item")]
    print(
        f"\n/big/: heads {min(big_heads)}..{max(big_heads)} B, omitted {min(big_omitted)}..{max(big_omitted)}"
        f" of {many_expected('/big/x').total}; /near/: heads {min(near_heads)}..{max(near_heads)} B;"
        f" Slack got {len(messages)} messages"
    )

    # exactly one alert per (origin, route pattern, condition) within the cooldown
    labels = [(condition_of(m), route_of(m)) for m in messages]
    assert labels[:2] == [("preflight", "/big/**"), ("preflight", "/near/**")]  # at startup, before traffic
    assert labels[2:] == [
        ("trimmed", "/big/**"),
        ("near_limit", "/near/**"),
        ("over_budget", "/"),
        ("over_budget", "/near/**"),
    ]
    for message in messages:
        assert isinstance(message["text"], str) and isinstance(message["blocks"], list)
        text = json.dumps(message)
        assert f"http://{LOCALHOST}:{origin.port}" in text
        assert "/big/item" not in text and "/near/item" not in text and "/plain/" not in text
        assert "9,728" in message["text"]

    trimmed_alert = messages[2]
    first = origin.only_request_to("/big/item-000")
    assert f"{len(first.head):,} of 9,728 bytes" in trimmed_alert["text"]
    assert "/big/**" in trimmed_alert["text"]
    assert "request id big-000" in json.dumps(trimmed_alert["blocks"])
    blocks = json.dumps(trimmed_alert["blocks"])
    assert "Largest flags" in blocks and "big-" in blocks and "(config)" in blocks
    over_alert = json.dumps(messages[4])
    # A hostile X-Request-Id never reaches Slack: the proxy replaced it with one of its own, and that
    # id is the one the origin received.
    huge0 = origin.only_request_to("/plain/huge-0").values("X-Request-Id")
    assert len(huge0) == 1 and f"request id {huge0[0]}" in over_alert
    assert "<!channel>" not in over_alert and "channel" not in over_alert
    near_alert = messages[3]
    near_first = origin.only_request_to("/near/item-00")
    assert f"{len(near_first.head):,} of 9,728 bytes" in near_alert["text"]
    assert "request id near-00" in json.dumps(near_alert["blocks"])

    # admin evaluate reports exactly what the origin did not get
    found, flag_bytes = flag_lines(first)
    base = len(first.head) - flag_bytes
    report = http_client().get(
        f"{proxy.base_url}/__flags/api/evaluate",
        params={"key": "u-1", "path": "/big/item-000", "head_bytes": str(base)},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert report.status_code == 200, report.text
    body = report.json()
    got = dict(found)
    kept_values = set(json.loads(got[NAME]))
    kept_configs = set(json.loads(got.get(CONFIG, b"{}")))
    expected = many_expected("/big/item-000")
    assert set(body["header"]["omitted"]["values"]) == set(expected.values) - kept_values
    assert set(body["header"]["omitted"]["configs"]) == set(expected.configs) - kept_configs
    assert body["header"]["budget"] == DEFAULT_BUDGET
    assert body["header"]["flag_header_bytes"] == flag_bytes
    omitted = len(body["header"]["omitted"]["values"]) + len(body["header"]["omitted"]["configs"])
    assert omitted == int(got[OMITTED])
    for key in expected.values:
        marker = body["flags"][key].get("omitted")
        if key not in kept_values:
            assert marker == "value", key
        elif key in expected.configs and key not in kept_configs:
            assert marker == "config", key
        else:
            assert marker is None, key


# --- 6. pre-flight ------------------------------------------------------------------------------------


def big_flag(route: str, size: int) -> dict[str, Any]:
    return {"routes": [route], "variants": {"v": {"weight": 1, "config": {"blob": "x" * size}}}}


def test_preflight_alerts_on_a_store_change_before_any_traffic(
    origin_factory: Callable[..., RawOrigin], slack: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    origin = origin_factory()
    env = {
        "FLAGPROXY_ALERTS_SLACK_WEBHOOK_URL": f"{slack.url}/preflight",
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
    }
    proxy = proxy_factory([origin.url], flags={"flags": {"small": {}}}, env=env)

    response = post_webhook(proxy.base_url, {"upsert": {"pf-webhook": big_flag("/pf/**", 9000)}}, SECRET)
    assert response.status_code == 202, response.text
    (first,) = wait_for_messages(slack, 1, "/preflight")
    assert (condition_of(first), route_of(first)) == ("preflight", "/pf/**")
    assert "pre-flight" in first["text"] and "9,728" in first["text"]
    worst = (
        1500
        + line(NAME, {"pf-webhook": '"v"', "small": "false"})  # a boolean's largest outcome is false
        + line(CONFIG, {"pf-webhook": encode_json({"blob": "x" * 9000})})
    )
    assert f"{worst:,} of 9,728 bytes" in first["text"]

    put = http_client().put(
        f"{proxy.base_url}/__flags/api/flags/pf-admin",
        json=big_flag("/pf-admin/**", 8000),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert put.status_code == 200, put.text
    messages = wait_for_messages(slack, 2, "/preflight")
    assert [(condition_of(m), route_of(m)) for m in messages] == [
        ("preflight", "/pf/**"),
        ("preflight", "/pf-admin/**"),
    ]
    assert origin.requests == []  # all of it before any traffic


def run_budget_cli(
    tmp_path: Path, flags: dict[str, Any], config: str | None = None
) -> subprocess.CompletedProcess[str]:
    flags_path = tmp_path / "flags.json"
    flags_path.write_text(json.dumps(flags))
    args = [PYTHON, "-m", "proxy", "budget", "--flags", str(flags_path)]
    if config is not None:
        config_path = tmp_path / "flagproxy.toml"
        config_path.write_text(config)
        args += ["--config", str(config_path)]
    env = clean_env({"PYTHONPATH": str(REPO)})
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False
    )


def table_rows(output: str) -> list[list[str]]:
    rows = [line_.strip("|").split("|") for line_ in output.splitlines() if line_.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # without the header and the rule


def test_budget_cli_exits_1_when_a_route_is_over_budget(tmp_path: Path) -> None:
    flags = {"flags": {"heavy": big_flag("/heavy/**", 12000), "light": {"priority": 1}}}
    result = run_budget_cli(tmp_path, flags)
    assert result.returncode == 1, result.stderr
    heavy = (
        1500
        + line(NAME, {"heavy": '"v"', "light": "false"})
        + line(CONFIG, {"heavy": encode_json({"blob": "x" * 12000})})
    )
    light = 1500 + line(NAME, {"light": "false"})
    assert "| origin | route | flags | worst-case bytes | budget | % of budget |" in result.stdout
    assert table_rows(result.stdout) == [
        ["/", "*", "1", f"{light:,}", "9,728", f"{100 * light / 9728:.1f} %"],
        ["/", "/heavy/**", "2", f"{heavy:,}", "9,728", f"{100 * heavy / 9728:.1f} % ⚠"],
    ]
    assert "1 route(s) can exceed" in result.stderr


def test_budget_cli_exits_0_when_every_route_fits(tmp_path: Path) -> None:
    flags = {"flags": {"fits": big_flag("/fits/**", 3000), "light": {}}}
    result = run_budget_cli(tmp_path, flags)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [r[:3] for r in rows] == [["/", "*", "1"], ["/", "/fits/**", "2"]]
    assert "⚠" not in result.stdout


def test_budget_cli_per_origin_budgets(tmp_path: Path) -> None:
    flags = {"flags": {"fits": big_flag("/fits/**", 3000), "tight": big_flag("/tiny/**", 3000)}}
    config = "[header]\nreserve_bytes = 0\n\n" + toml_origins(
        [("/", "http://127.0.0.1:1", None, None), ("/tiny", "http://127.0.0.1:2", 2000, 100)]
    )
    result = run_budget_cli(tmp_path, flags, config)
    assert result.returncode == 1, result.stderr
    rows = {(r[0], r[1]): r for r in table_rows(result.stdout)}
    assert rows[("/", "/fits/**")][4] == "10,240" and "⚠" not in rows[("/", "/fits/**")][5]
    assert rows[("/tiny", "/tiny/**")][4] == "1,900" and "⚠" in rows[("/tiny", "/tiny/**")][5]
    # Each route is checked against the origin that serves it, never against the others.
    assert ("/tiny", "/fits/**") not in rows and ("/", "/tiny/**") not in rows
    assert {("/", "*"), ("/tiny", "*")} <= set(rows)
