"""Request context: key sources in order, verified JWT and Telegram initData, sticky anonymous ids."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import ConfigError, ContextSettings
from proxy.dataplane.context import ContextBuilder

BOT_TOKEN = "123456:TEST-bot-token"
SECRET = "s3cret-for-tests-only-0123456789abcdef"


def scope(
    headers: dict[str, str] | list[tuple[str, str]] = (), query: str = "", path: str = "/api/x"
) -> dict:
    items = headers.items() if isinstance(headers, dict) else headers
    return {
        "type": "http",
        "path": path,
        "method": "GET",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in items],
    }


def builder(**changes: Any) -> ContextBuilder:
    return ContextBuilder(dataclasses.replace(ContextSettings(), **changes))


def telegram_init_data(
    user_id: int, auth_date: int | None = None, token: str = BOT_TOKEN, **extra: str
) -> str:
    """Telegram's documented WebApp scheme, written out independently of the proxy."""
    fields = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps(
            {"id": user_id, "first_name": "Ann", "language_code": "en"}, separators=(",", ":")
        ),
        "auth_date": str(auth_date if auth_date is not None else int(time.time())),
        **extra,
    }
    check = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode(fields)


def test_path_and_method_always_present_and_header_key() -> None:
    ctx, extra = builder().build(scope({"X-User-Id": " 42 "}))
    assert ctx == {"path": "/api/x", "method": "GET", "key": "42"}
    assert extra == []


def test_cookie_and_query_sources_in_configured_order() -> None:
    b = builder(key_cookie="uid", key_query="user", key_sources=("query", "cookie", "header"))
    ctx, _ = b.build(scope({"X-User-Id": "h", "Cookie": "a=1; uid=c"}, query="user=q&x=1"))
    assert ctx["key"] == "q"
    ctx, _ = b.build(scope({"X-User-Id": "h", "Cookie": "a=1; uid=c"}))
    assert ctx["key"] == "c"
    ctx, _ = b.build(scope({"X-User-Id": "h"}))
    assert ctx["key"] == "h"


def test_attributes_from_headers_and_query() -> None:
    b = builder(header_attributes=("X-Country=country", "X-App-Version=version"), query_attributes=("plan",))
    ctx, _ = b.build(scope({"X-Country": "NZ", "X-App-Version": "2.1.0", "X-User-Id": "1"}, query="plan=pro"))
    assert ctx["country"] == "NZ" and ctx["version"] == "2.1.0" and ctx["plan"] == "pro"


def test_jwt_hs256_verified_claim_becomes_key_and_attributes() -> None:
    b = builder(jwt_secret=SECRET, key_sources=("jwt", "header"), jwt_attributes=("tier=tier", "org.id=org"))
    token = jwt.encode({"sub": "user-9", "tier": "gold", "org": {"id": 7}}, SECRET, algorithm="HS256")
    ctx, _ = b.build(scope({"Authorization": f"Bearer {token}", "X-User-Id": "h"}))
    assert ctx["key"] == "user-9" and ctx["tier"] == "gold" and ctx["org"] == 7


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode({"sub": "forged"}, "w" * 40, algorithm="HS256"),
        jwt.encode({"sub": "late", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "none-alg"}, key=None, algorithm="none"),
        "not.a.jwt",
    ],
)
def test_unverifiable_jwt_is_ignored(token: str) -> None:
    b = builder(jwt_secret=SECRET, key_sources=("jwt", "header"), anonymous_cookie="")
    ctx, _ = b.build(scope({"Authorization": f"Bearer {token}", "X-User-Id": "from-header"}))
    assert ctx["key"] == "from-header"


def test_unverified_jwt_only_when_explicitly_allowed() -> None:
    token = jwt.encode({"sub": "anyone"}, "x" * 40, algorithm="HS256")
    ctx, _ = builder(key_sources=("jwt",), anonymous_cookie="").build(
        scope({"Authorization": f"Bearer {token}"})
    )
    assert "key" not in ctx
    b = builder(key_sources=("jwt",), jwt_verify=False, anonymous_cookie="")
    ctx, _ = b.build(scope({"Authorization": f"Bearer {token}"}))
    assert ctx["key"] == "anyone"


def test_jwt_rs256_with_public_key_file(tmp_path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    b = builder(jwt_public_key=str(tmp_path / "pub.pem"), key_sources=("jwt",), anonymous_cookie="")
    good = jwt.encode({"sub": "rs-user"}, private, algorithm="RS256")
    assert b.build(scope({"Authorization": f"Bearer {good}"}))[0]["key"] == "rs-user"
    # An HS256 token "signed" with the public key text must not pass (algorithm confusion).
    forged = jwt.encode({"sub": "x"}, "n" * 40, algorithm="HS256")
    assert "key" not in b.build(scope({"Authorization": f"Bearer {forged}"}))[0]


def test_telegram_init_data_verified_user_id_is_key() -> None:
    b = builder(telegram_bot_token=BOT_TOKEN, key_sources=("telegram", "header"), anonymous_cookie="")
    ctx, _ = b.build(scope({"X-Telegram-Init-Data": telegram_init_data(777000), "X-User-Id": "h"}))
    assert ctx["key"] == "777000"


@pytest.mark.parametrize(
    "init_data",
    [
        telegram_init_data(1, token="999:other-bot"),  # signed for another bot
        telegram_init_data(1, auth_date=int(time.time()) - 2 * 86400),  # expired
        telegram_init_data(1).replace("Ann", "Eve"),  # tampered
        "garbage=%%%",
        "",
    ],
)
def test_bad_or_expired_init_data_is_ignored(init_data: str) -> None:
    b = builder(telegram_bot_token=BOT_TOKEN, key_sources=("telegram", "header"), anonymous_cookie="")
    ctx, _ = b.build(scope({"X-Telegram-Init-Data": init_data, "X-User-Id": "fallback"}))
    assert ctx["key"] == "fallback"


def test_anonymous_caller_gets_sticky_cookie() -> None:
    b = builder()
    ctx, extra = b.build(scope())
    assert len(extra) == 1 and extra[0][0] == b"set-cookie"
    cookie = extra[0][1].decode()
    name_value, *attrs = [p.strip() for p in cookie.split(";")]
    name, value = name_value.split("=", 1)
    assert name == "flag_uid" and value == ctx["key"] and len(value) >= 16
    assert {"HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=31536000"} <= set(attrs)
    again, extra2 = b.build(scope({"Cookie": f"other=1; flag_uid={value}"}))
    assert again["key"] == value and extra2 == []
    assert builder().build(scope())[0]["key"] != value  # random per new caller


def test_anonymous_cookie_can_be_disabled_or_renamed() -> None:
    ctx, extra = builder(anonymous_cookie="").build(scope())
    assert "key" not in ctx and extra == []
    _, extra = builder(anonymous_cookie="anon", anonymous_cookie_secure=True).build(scope())
    assert extra[0][1].startswith(b"anon=") and b"; Secure" in extra[0][1]


def test_bad_context_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="key_sources"):
        builder(key_sources=("header", "carrier-pigeon"))
    with pytest.raises(ConfigError, match="header_attributes"):
        builder(header_attributes=("=country",))


def test_cookie_attributes_read_named_cookies() -> None:
    ctx, _ = builder(cookie_attributes=("sid=sessionId", "plan")).build(
        scope({"Cookie": "sid=abc123; other=x", "X-User-Id": "u"})
    )
    assert ctx["sessionId"] == "abc123" and "plan" not in ctx and "other" not in ctx


def test_client_address_attribute_follows_the_trusted_proxy_rules() -> None:
    def address(peer: str, forwarded: list[str], trusted: tuple[str, ...] = ("10.0.0.0/8",)) -> Any:
        settings = dataclasses.replace(ContextSettings(), client_address_attribute="remoteAddress")
        request = scope([("X-Forwarded-For", value) for value in forwarded])
        request["client"] = (peer, 51234)
        return ContextBuilder(settings, trusted_proxies=trusted).build(request)[0].get("remoteAddress")

    assert address("203.0.113.9", []) == "203.0.113.9"
    assert address("203.0.113.9", ["198.51.100.1"]) == "203.0.113.9"  # an untrusted peer's claim is ignored
    assert address("10.0.0.2", ["198.51.100.1"]) == "198.51.100.1"
    assert address("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.7"]) == "198.51.100.1"  # nearest untrusted hop
    assert address("10.0.0.2", ["6.6.6.6", "198.51.100.1"]) == "198.51.100.1"  # two headers, in order
    assert address("10.0.0.2", ["10.0.0.9"]) == "10.0.0.9"  # all trusted: the farthest
    assert address("10.0.0.2", []) == "10.0.0.2"
    assert builder().build(scope({}))[0].get("remoteAddress") is None  # not asked for: not set
