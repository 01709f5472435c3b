"""The client flags API over HTTP (docs/clients.md): keys, globs, OFREP bodies, ETags, the compact
call, CORS, rate limits, hostile bodies, and keys kept out of the logs — against a real proxy."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from support import LOCALHOST, ProxyProcess, RawOrigin, run_serve, served_flags, wait_for

WEB_KEY = "web-key-0123456789abcdef"
GAME_KEY = "game-key-0123456789abcdef"
ADMIN = "admin-token-0123456789"
FLAGS: dict[str, Any] = {
    "flags": {
        "layout": {
            "variants": {"classic": {"weight": 50}, "compact": {"weight": 50, "config": {"rows": 3}}},
            "defaultVariant": "classic",
            "rules": [{"if": {"==": [{"var": "country"}, "NZ"]}, "variant": "compact"}],
        },
        "dark-mode": {},
        "off": {"enabled": False},
        "game-speed": {"variants": {"slow": {"weight": 1, "config": {"tick": 3}}, "fast": {"weight": 1}}},
        "by-team": {
            "variants": {"x": {"weight": 1}, "y": {"weight": 1}},
            "defaultVariant": "x",
            "bucketBy": "team",
        },
        "internal-tool": {},
    }
}
CONFIG = f"""
[admin]
token = "{ADMIN}"
[client_api]
cors_origins = ["http://app.test"]
max_payload_bytes = 60
[[client_keys]]
name = "web"
key = "{WEB_KEY}"
flags = ["layout", "dark-mode", "off", "by-team"]
[[client_keys]]
name = "game"
key_env = "GAME_CLIENT_KEY"
flags = ["game-*", "layout"]
"""


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    return proxy_factory(
        [origin.url],
        config=CONFIG,
        flags=FLAGS,
        env={"GAME_CLIENT_KEY": GAME_KEY, "FLAGPROXY_LOG_ACCESS_LOG": "true"},
        log_level="info",
    )


@pytest.fixture(scope="module")
def http(proxy: ProxyProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{proxy.base_url}/__flags", timeout=10) as client:
        yield client


def bulk(http: httpx.Client, context: Any, key: str = WEB_KEY, **headers: str) -> httpx.Response:
    return http.post(
        "/ofrep/v1/evaluate/flags", json={"context": context}, headers={"X-API-Key": key, **headers}
    )


def single(http: httpx.Client, flag: str, body: Any, key: str = WEB_KEY) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        f"/ofrep/v1/evaluate/flags/{flag}",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


def test_bulk_answers_every_visible_flag_with_standard_reasons_and_variants(http: httpx.Client) -> None:
    response = bulk(http, {"targetingKey": "user-1", "country": "NZ", "team": "red"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    flags = {item["key"]: item for item in response.json()["flags"]}
    assert sorted(flags) == ["by-team", "dark-mode", "layout", "off"]  # the key's globs, nothing else
    assert flags["layout"] == {
        "key": "layout",
        "value": {"rows": 3},
        "variant": "compact",
        "reason": "TARGETING_MATCH",
        "metadata": {"flagReason": "rule", "rule": 0},
    }
    assert flags["dark-mode"]["value"] is True and flags["dark-mode"]["variant"] == "true"
    assert flags["dark-mode"]["reason"] == "STATIC"
    assert flags["off"] == {
        "key": "off",
        "value": False,
        "variant": "false",
        "reason": "DISABLED",
        "metadata": {"flagReason": "disabled"},
    }
    assert flags["by-team"]["reason"] == "SPLIT" and flags["by-team"]["value"] in ("x", "y")
    for item in flags.values():
        assert all(isinstance(v, (str, int, float, bool)) for v in item["metadata"].values())


def test_the_same_unit_gets_the_same_variant_from_ofrep_the_compact_call_and_the_origin_header(
    http: httpx.Client, proxy: ProxyProcess, origin: RawOrigin
) -> None:
    for user in [f"user-{i}" for i in range(12)]:
        header = served_flags(proxy, origin, user=user)
        ofrep = {f["key"]: f["variant"] for f in bulk(http, {"targetingKey": user}).json()["flags"]}
        compact = http.get("/client/v1/flags", params={"key": user}, headers={"X-API-Key": GAME_KEY})
        assert ofrep["by-team"] == header["by-team"]
        assert compact.json()["variants"]["layout"] == ofrep["layout"] == header["layout"]
        assert compact.json()["variants"]["game-speed"] == header["game-speed"]


def test_bulk_etag_is_a_hash_of_the_body_and_if_none_match_gives_304(http: httpx.Client) -> None:
    first = bulk(http, {"targetingKey": "user-2"})
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert bulk(http, {"targetingKey": "user-2"}).headers["etag"] == etag  # stable
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = bulk(http, {"targetingKey": "user-2"}, **{"If-None-Match": sent})
        assert again.status_code == 304, sent
        assert again.content == b"" and again.headers["etag"] == etag
    assert bulk(http, {"targetingKey": "user-2"}, **{"If-None-Match": '"stale"'}).status_code == 200
    other_unit = bulk(http, {"targetingKey": "user-2", "country": "NZ"})
    assert other_unit.headers["etag"] != etag  # context-dependent values, their own validator


def test_bulk_advertises_the_stream_with_a_token_not_the_key(http: httpx.Client, proxy: ProxyProcess) -> None:
    streams = bulk(http, {"targetingKey": "u"}).json()["eventStreams"]
    assert len(streams) == 1 and streams[0]["type"] == "sse"
    endpoint = streams[0]["endpoint"]
    assert endpoint["origin"] == proxy.base_url
    assert endpoint["requestUri"].startswith("/__flags/client/v1/stream?token=web.")
    assert WEB_KEY not in json.dumps(streams)
    # the trailing-slash form of bulk is the same endpoint
    slash = http.post(
        "/ofrep/v1/evaluate/flags/", json={"context": {"targetingKey": "u"}}, headers={"X-API-Key": WEB_KEY}
    )
    assert slash.status_code == 200 and slash.json()["eventStreams"] == streams


def test_single_flag_success_and_not_found_bodies(http: httpx.Client) -> None:
    ok = single(http, "layout", {"context": {"targetingKey": "user-3", "country": "NZ"}})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert ok.json()["variant"] == "compact" and ok.json()["value"] == {"rows": 3}
    for flag in ("missing", "internal-tool", "game-speed"):  # unknown, or outside the key's globs
        response = single(http, flag, {"context": {"targetingKey": "user-3"}})
        assert response.status_code == 404
        assert response.json() == {
            "key": flag,
            "errorCode": "FLAG_NOT_FOUND",
            "errorDetails": f"flag {flag!r} not found",
        }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "PARSE_ERROR"),
        (b"", "PARSE_ERROR"),
        (b"[1, 2]", "PARSE_ERROR"),
        (b'{"context": NaN}', "PARSE_ERROR"),
        (b'{"context": "\\ud800"}', "PARSE_ERROR"),
        (b"[" * 100_00 + b"]" * 100_00, "PARSE_ERROR"),
        (b'{"context": []}', "INVALID_CONTEXT"),
        (b'{"context": {"targetingKey": 42}}', "INVALID_CONTEXT"),
        (b'{"context": {"targetingKey": ["a"]}}', "INVALID_CONTEXT"),
        (json.dumps({"context": {f"a{i}": i for i in range(300)}}).encode(), "INVALID_CONTEXT"),
        (json.dumps({"context": {"targetingKey": "x" * 2000}}).encode(), "INVALID_CONTEXT"),
    ],
)
def test_bad_bodies_are_400_with_an_ofrep_error_code(http: httpx.Client, body: bytes, code: str) -> None:
    response = single(http, "layout", body)
    assert response.status_code == 400, response.text
    assert response.json()["errorCode"] == code and response.json()["errorDetails"]
    assert response.json()["key"] == "layout"


def test_without_a_targeting_key_only_flags_that_bucket_on_the_unit_are_missing(http: httpx.Client) -> None:
    items = {item["key"]: item for item in bulk(http, {}).json()["flags"]}
    assert items["layout"] == {
        "key": "layout",
        "errorCode": "TARGETING_KEY_MISSING",
        "errorDetails": "no targetingKey: this flag buckets on the unit key",
    }
    assert items["dark-mode"]["value"] is True and items["off"]["value"] is False
    # a rule on an attribute still serves without a unit
    assert bulk(http, {"country": "NZ"}).json()["flags"][2]["variant"] == "compact"
    response = single(http, "layout", {"context": {}})
    assert response.status_code == 400 and response.json()["errorCode"] == "TARGETING_KEY_MISSING"
    assert single(http, "dark-mode", {}).json()["value"] is True  # no "context" at all: an empty one


def test_unicode_context_values_and_keys(http: httpx.Client) -> None:
    response = single(http, "layout", {"context": {"targetingKey": "ユーザー🙂", "country": "NZ"}})
    assert response.status_code == 200 and response.json()["variant"] == "compact"


def test_huge_body_is_413(http: httpx.Client) -> None:
    body = json.dumps({"context": {"targetingKey": "u", "blob": "x" * 70_000}}).encode()
    response = single(http, "layout", body)
    assert response.status_code == 413 and response.json()["errorCode"] == "GENERAL"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong-key-0123456789abcd"},
        {"Authorization": "Bearer nope"},
        {"Authorization": WEB_KEY},
    ],
)
def test_missing_or_wrong_key_is_401_json(http: httpx.Client, headers: dict[str, str]) -> None:
    for response in (
        http.post("/ofrep/v1/evaluate/flags", json={"context": {}}, headers=headers),
        http.post("/ofrep/v1/evaluate/flags/layout", json={"context": {}}, headers=headers),
    ):
        assert response.status_code == 401
        assert response.json() == {"errorCode": "GENERAL", "errorDetails": "a valid client key is required"}
    compact = http.get("/client/v1/flags", headers=headers)
    assert compact.status_code == 401 and compact.json()["error"] == "unauthorized"


def test_compact_call_values_variants_cache_control_and_flag_filter(http: httpx.Client) -> None:
    response = http.get(
        "/client/v1/flags",
        params={"key": "player-1", "country": "NZ"},
        headers={"X-API-Key": GAME_KEY, "Accept-Encoding": "identity"},
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "private, max-age=30"
    assert "content-encoding" not in response.headers
    body = response.json()
    assert body["flags"]["layout"] == {"rows": 3} and body["variants"]["layout"] == "compact"
    assert sorted(body["flags"]) == ["game-speed", "layout"]
    narrowed = http.get(
        "/client/v1/flags",
        params={"key": "player-1", "flags": "layout,dark-mode,nope"},
        headers={"X-API-Key": GAME_KEY},
    )
    assert list(narrowed.json()["flags"]) == ["layout"]  # dark-mode is not the game key's


def test_compact_call_gzip_and_304(http: httpx.Client) -> None:
    params = {"key": "player-2"}
    raw = httpx.get(
        f"{http.base_url}/client/v1/flags",
        params=params,
        headers={"X-API-Key": GAME_KEY, "Accept-Encoding": "gzip"},
    )
    assert raw.headers["content-encoding"] == "gzip" and raw.headers["vary"] == "Accept-Encoding"
    plain = http.get(
        "/client/v1/flags", params=params, headers={"X-API-Key": GAME_KEY, "Accept-Encoding": "identity"}
    )
    assert raw.json() == plain.json()  # httpx decoded the gzip body
    assert gzip.decompress(gzip.compress(plain.content)) == plain.content
    for response in (raw, plain):
        again = http.get(
            "/client/v1/flags",
            params=params,
            headers={"X-API-Key": GAME_KEY, "If-None-Match": response.headers["etag"]},
        )
        assert again.status_code == 304 and again.content == b""
        assert again.headers["cache-control"] == "private, max-age=30"
    assert raw.headers["etag"] != plain.headers["etag"]  # two representations, two strong validators


def metric(proxy: ProxyProcess, name: str) -> float:
    text = httpx.get(f"{proxy.base_url}/__flags/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_over_budget_responses_are_sent_counted_each_time_and_logged_once(
    http: httpx.Client, proxy: ProxyProcess
) -> None:
    before = metric(proxy, "flagproxy_client_payload_over_budget_total")
    for unit in ("p1", "p2", "p3"):
        response = http.get(
            "/client/v1/flags",
            params={"key": unit, "flags": "layout,game-speed"},
            headers={"X-API-Key": GAME_KEY},
        )
        assert response.status_code == 200 and len(response.content) > 60
    assert metric(proxy, "flagproxy_client_payload_over_budget_total") == before + 3
    line = "over [client_api] max_payload_bytes (60); flags: game-speed,layout"
    assert wait_for(lambda: proxy.stderr().count(line)) == 1  # once per key and flag set
    etag = response.headers["etag"]
    for _ in range(2):  # a 304 sends no body: nothing over the budget
        again = http.get(
            "/client/v1/flags",
            params={"key": "p3", "flags": " game-speed , layout,"},  # spaces and a trailing comma
            headers={"X-API-Key": GAME_KEY, "If-None-Match": etag},
        )
        assert again.status_code == 304
    assert metric(proxy, "flagproxy_client_payload_over_budget_total") == before + 3


def test_compact_call_refuses_a_flood_of_attributes(http: httpx.Client) -> None:
    params = {f"a{i}": "x" for i in range(300)} | {"key": "p"}
    response = http.get("/client/v1/flags", params=params, headers={"X-API-Key": GAME_KEY})
    assert response.status_code == 400 and response.json()["error"] == "bad_context"


def test_unknown_paths_and_methods_carry_cors_too(http: httpx.Client) -> None:
    wrong_method = http.get("/ofrep/v1/evaluate/flags", headers={"Origin": "http://app.test"})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
    assert wrong_method.headers["access-control-allow-origin"] == "http://app.test"
    assert "POST" in wrong_method.headers["allow"]
    nowhere = http.get("/client/v1/nope", headers={"Origin": "http://app.test"})
    assert nowhere.status_code == 404 and nowhere.json()["error"] == "not_found"
    assert nowhere.headers["access-control-expose-headers"] == "ETag, Retry-After"


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(proxy: ProxyProcess) -> None:
    with socket.create_connection((LOCALHOST, proxy.port), timeout=5) as conn:
        conn.sendall(
            b"POST /__flags/ofrep/v1/evaluate/flags HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + WEB_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{"
        )
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]


def test_a_rule_rollout_without_a_targeting_key_is_targeting_key_missing(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    """A matching rule that splits by percentage has nothing to bucket by without a unit: the app
    gets its code default (400), not an unbucketed value reported as a targeted match."""
    flags = {
        "flags": {
            "rule-rollout": {
                "variants": {"a": {"weight": 100}, "b": {"weight": 0}},
                "defaultVariant": "a",
                "rules": [{"if": {"==": [{"var": "country"}, "NZ"]}, "rollout": {"a": 50, "b": 50}}],
            },
            "rule-percentage": {
                "percentage": 100,
                "rules": [{"if": {"==": [{"var": "country"}, "NZ"]}, "percentage": 50}],
            },
            "rule-variant": {
                "variants": {"a": {"weight": 1}, "b": {"weight": 1}},
                "defaultVariant": "a",
                "rules": [{"if": {"==": [{"var": "country"}, "NZ"]}, "variant": "b"}],
            },
        }
    }
    own = proxy_factory([origin.url], config=f'[[client_keys]]\nname = "w"\nkey = "{WEB_KEY}"\n', flags=flags)
    with httpx.Client(base_url=f"{own.base_url}/__flags", timeout=10) as client:
        for flag in ("rule-rollout", "rule-percentage"):
            response = single(client, flag, {"context": {"country": "NZ"}})
            assert response.status_code == 400 and response.json()["errorCode"] == "TARGETING_KEY_MISSING"
            assert (
                single(client, flag, {"context": {"country": "NZ", "targetingKey": "u"}}).status_code == 200
            )
        assert single(client, "rule-variant", {"context": {"country": "NZ"}}).json()["value"] == "b"
        items = {i["key"]: i for i in bulk(client, {"country": "NZ"}).json()["flags"]}
        assert items["rule-rollout"]["errorCode"] == "TARGETING_KEY_MISSING"
        assert items["rule-percentage"]["errorCode"] == "TARGETING_KEY_MISSING"
        assert items["rule-variant"]["reason"] == "TARGETING_MATCH"


def test_a_stalled_body_is_408_after_body_idle_timeout(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    own = proxy_factory(
        [origin.url],
        config=f'[[client_keys]]\nname = "w"\nkey = "{WEB_KEY}"\n',
        flags=FLAGS,
        env={"FLAGPROXY_SERVER_BODY_IDLE_TIMEOUT_S": "0.5"},
    )
    with socket.create_connection((LOCALHOST, own.port), timeout=10) as conn:
        conn.sendall(
            b"POST /__flags/ofrep/v1/evaluate/flags HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + WEB_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert b'"body_timeout"' in answer and time.monotonic() - started < 5


def test_cors_preflight_and_exposed_headers(http: httpx.Client) -> None:
    preflight = http.options(
        "/ofrep/v1/evaluate/flags",
        headers={
            "Origin": "http://app.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization, if-none-match",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://app.test"
    assert (
        preflight.headers["access-control-allow-headers"]
        == "Content-Type, Authorization, X-API-Key, If-None-Match"
    )
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert int(preflight.headers["access-control-max-age"]) > 0
    stranger = http.options(
        "/client/v1/flags", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"}
    )
    assert stranger.status_code == 403 and "access-control-allow-origin" not in stranger.headers
    for response in (
        bulk(http, {"targetingKey": "u"}, Origin="http://app.test"),
        bulk(http, {"targetingKey": "u"}, key="wrong-key-0123456789abcd", Origin="http://app.test"),
        single(http, "nope", {}),
    ):
        if response.request.headers.get("origin"):
            assert response.headers["access-control-allow-origin"] == "http://app.test"
            assert response.headers["access-control-expose-headers"] == "ETag, Retry-After"
            assert "Origin" in response.headers["vary"]
    assert "access-control-allow-origin" not in bulk(http, {}, Origin="http://evil.test").headers


def test_keys_and_tokens_are_not_logged(http: httpx.Client, proxy: ProxyProcess) -> None:
    uri = bulk(http, {"targetingKey": "u"}).json()["eventStreams"][0]["endpoint"]["requestUri"]
    token = uri.split("token=")[1]
    with httpx.stream("GET", f"{proxy.base_url}{uri}", timeout=5) as stream:
        assert stream.status_code == 200
    http.get("/client/v1/flags", params={"key": "p"}, headers={"X-API-Key": GAME_KEY})
    wait_for(lambda: "/__flags/client/v1/stream" in proxy.stderr(), what="the stream's access-log line")
    log = proxy.stderr()
    assert "/__flags/ofrep/v1/evaluate/flags" in log  # the access log is on
    for secret in (WEB_KEY, GAME_KEY, token, token.rsplit(".", 1)[1]):
        assert secret not in log


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[[client_keys]]\nname = "a"\nkey = "short"', "at least 16"),
        ('[[client_keys]]\nname = "a"\nkey_env = "NOT_SET_ANYWHERE"', "NOT_SET_ANYWHERE is not set"),
        ('[[client_keys]]\nname = "a"', "key: missing"),
        ('[[client_keys]]\nkey = "k-0123456789abcdef"\n[[client_keys]]\nkey = "k-0123456789abcdef"', "twice"),
        ('[client_api]\ncors_origins = ["app.test/x"]', "cors_origins"),
        ("[client_api]\nmax_streams = 0", "max_streams"),
    ],
)
def test_bad_client_settings_stop_startup_with_a_clear_message(
    tmp_path: Any, table: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(table)
    result = run_serve(["--config", str(config), "--origin", "http://127.0.0.1:9"])
    assert result.returncode != 0
    assert message in result.stderr


def test_without_client_keys_the_endpoints_do_not_exist(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    bare = proxy_factory([origin.url], flags=FLAGS)
    for method, path in [
        ("POST", "/ofrep/v1/evaluate/flags"),
        ("POST", "/ofrep/v1/evaluate/flags/layout"),
        ("GET", "/client/v1/flags"),
        ("GET", "/client/v1/stream"),
    ]:
        response = httpx.request(method, f"{bare.base_url}/__flags{path}", headers={"X-API-Key": WEB_KEY})
        assert response.status_code == 404 and response.json() == {
            "error": "not_found",
            "detail": "the client API is disabled: configure [[client_keys]] (docs/clients.md)",
        }


def test_rate_limit_is_429_with_integer_retry_after(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    limited = proxy_factory(
        [origin.url],
        flags=FLAGS,
        config=CONFIG.replace("max_payload_bytes = 60", "rate_limit_per_s = 0.5"),
        env={"GAME_CLIENT_KEY": GAME_KEY},
    )
    url = f"{limited.base_url}/__flags/ofrep/v1/evaluate/flags"
    assert httpx.post(url, json={"context": {}}, headers={"X-API-Key": WEB_KEY}).status_code == 200
    refused = httpx.post(
        url, json={"context": {}}, headers={"X-API-Key": WEB_KEY, "Origin": "http://app.test"}
    )
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"  # whole seconds until the next token
    assert refused.json()["errorCode"] == "GENERAL"
    assert refused.headers["access-control-allow-origin"] == "http://app.test"
    # per key: the game key has its own bucket
    assert httpx.post(url, json={"context": {}}, headers={"X-API-Key": GAME_KEY}).status_code == 200
