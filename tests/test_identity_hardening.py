"""Who is calling, against hostile callers: verification caches bounded by bytes, credentials over
8 KB never verified, verdicts that time can change never cached, verified key sources first, and an
anonymous cookie a client cannot forge once it is signed.

The proxy runs in this process (uvicorn in a thread) so that a test can read its caches, measure its
memory with tracemalloc and record the key of every exchange; the origin is a real socket server
on 127.0.0.1 and the clients are real HTTP clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import LOCALHOST, InProcessProxy, RawOrigin, free_port, raw_request, read_response

from proxy.app import FlagProxy
from proxy.config import ConfigError, ContextSettings, load_settings
from proxy.dataplane.context import ContextBuilder
from proxy.dataplane.exchange import Exchange

SECRET = "hs256-secret-for-tests-only-0123456789"
BOT_TOKEN = "123456:TEST-bot-token"
COOKIE_SECRET = "cookie-secret-for-tests-0123456789abcdef"
MiB = 1 << 20
CACHE_BYTES = 8 * MiB  # the documented default of [context] identity_cache_bytes
FALLBACK = "from-the-header"
# Spelled out where a test is about the caches, so that it shows the same on any default order.
VERIFIED_FIRST = ["jwt", "telegram", "header"]


class Keys:
    """Records the key of every finished exchange (inline: on the loop, right after the response)."""

    name = "keys"
    inline = True

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.changed = threading.Condition()

    def observe(self, exchange: Exchange) -> None:
        with self.changed:
            self.seen.append(exchange.key)
            self.changed.notify_all()

    def wait(self, count: int, timeout: float = 30.0) -> list[str | None]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.seen) >= count, timeout), (
                f"{len(self.seen)} of {count} exchanges observed"
            )
            return list(self.seen)


@dataclasses.dataclass
class Served:
    proxy: InProcessProxy
    keys: Keys

    @property
    def app(self) -> FlagProxy:
        app: FlagProxy = self.proxy.app
        return app

    def key_of(
        self, client: httpx.Client, path: str, headers: dict[str, str]
    ) -> tuple[str | None, httpx.Response]:
        """The key the proxy resolved for one request, and the response."""
        before = len(self.keys.seen)
        response = client.get(f"{self.proxy.url}{path}", headers=headers)
        assert response.status_code == 200, (response.status_code, response.text)
        return self.keys.wait(before + 1)[before], response


@pytest.fixture
def serve(origin: RawOrigin, tmp_path: Path) -> Iterator[Any]:
    """``serve(**context_settings)`` → a running in-process proxy with a ``Keys`` recorder."""
    started: list[InProcessProxy] = []
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"flags": {"banner": {}}}))

    def make(**context: Any) -> Served:
        settings = load_settings(
            env={},
            overrides={"context": context, "store": {"flags_file": str(flags)}},
            origins=[origin.url],
        )
        keys = Keys()
        proxy = InProcessProxy(FlagProxy(settings, observers=[keys]), free_port()).__enter__()
        started.append(proxy)
        return Served(proxy, keys)

    yield make
    for proxy in started:
        proxy.__exit__()


def bearer(claims: dict[str, Any], secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256")}


def telegram_init_data(user_id: int, token: str = BOT_TOKEN, **extra: str) -> str:
    """Telegram's documented WebApp scheme, written out independently of the proxy."""
    fields = {
        "user": json.dumps({"id": user_id, "first_name": "Ann"}, separators=(",", ":")),
        "auth_date": str(int(time.time())),
        **extra,
    }
    check = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode(fields)


def wait_past(unix_time: float) -> None:
    """Block until the wall clock is past ``unix_time`` (what the proxy's token checks read)."""
    remaining = unix_time + 0.05 - time.time()
    if remaining > 0:
        threading.Event().wait(remaining)
    assert time.time() > unix_time


# --- bounded memory, credential checks ------------------------------------------------------------

REQUESTS = 10_000
GROWTH_BOUND = 2 * CACHE_BYTES + 8 * MiB  # both caches full, plus the proxy's own working set


@pytest.mark.slow  # make test-slow
def test_ten_thousand_hostile_identities_stay_within_the_cache_bounds(serve: Any, origin: RawOrigin) -> None:
    """A third each: distinct ~60 KB forged JWTs; distinct initData, half ~60 KB, half valid ~7 KB;
    distinct valid ~7 KB JWTs whose claims are large in memory (which the cache must hold and
    evict by bytes)."""
    served = serve(key_sources=VERIFIED_FIRST, jwt_secret=SECRET, telegram_bot_token=BOT_TOKEN)
    jwt_cache = served.app.resolver.context.jwt.cache
    telegram_cache = served.app.resolver.context.telegram.cache
    forged = jwt.encode({"sub": "mallory", "pad": "p" * 44_000}, "not-the-secret-" * 3, algorithm="HS256")
    init_pad = "q" * 60_000
    expected: list[str] = []

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        worst = 0
        with socket.create_connection((LOCALHOST, served.proxy.port), timeout=30) as sock:
            for i in range(REQUESTS):
                kind = i % 3
                if kind == 0:
                    credential = ("Authorization", f"Bearer {forged}{i:06d}")  # distinct, ~60 KB
                    expected.append(FALLBACK)
                elif kind == 1 and i % 2:
                    credential = ("X-Telegram-Init-Data", f"{telegram_init_data(i)}&pad={init_pad}{i}")
                    expected.append(FALLBACK)
                elif kind == 1:  # valid, distinct, ~7 KB
                    credential = ("X-Telegram-Init-Data", telegram_init_data(i, pad=init_pad[:7000]))
                    expected.append(str(i))
                else:
                    roles = [f"role-{i}-{j}" for j in range(350)]
                    credential = (
                        "Authorization",
                        bearer({"sub": f"user-{i}", "roles": roles})["Authorization"],
                    )
                    assert len(credential[1]) <= 8192 + len("Bearer ")
                    expected.append(f"user-{i}")
                sock.sendall(raw_request("GET", f"/hostile/{i}", [credential, ("X-User-Id", FALLBACK)]))
                assert read_response(sock).status == 200
                if i % 250 == 249:
                    with origin.changed:  # the origin's own records are not the proxy's memory
                        origin.requests.clear()
                    growth = tracemalloc.get_traced_memory()[0] - baseline
                    worst = max(worst, growth)
                    assert growth < GROWTH_BOUND, f"{growth / MiB:.1f} MiB more after {i + 1} requests"
    finally:
        tracemalloc.stop()

    assert served.keys.wait(REQUESTS) == expected  # oversized credentials read as not verified
    assert 0 < jwt_cache.bytes <= CACHE_BYTES and 0 < telegram_cache.bytes <= CACHE_BYTES
    assert len(jwt_cache) < REQUESTS // 3  # the valid tokens did not all fit: the oldest went
    assert worst < GROWTH_BOUND


def test_verdict_cache_accounts_what_it_holds() -> None:
    """The accounted bytes of a full cache are close to what its entries really take."""
    from proxy.dataplane.context import VerdictCache

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = VerdictCache(2 * MiB)
        for i in range(5_000):
            claims = {"sub": f"user-{i}", "roles": [f"role-{i}-{j}" for j in range(40)]}
            cache.put(cache.digest(f"token-{i}"), (claims, None))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < cache.bytes <= 2 * MiB and len(cache) < 5_000
    assert held <= 1.25 * cache.bytes, (held, cache.bytes)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=4_000) | st.just(1 << 30),
    operations=st.lists(
        st.tuples(st.integers(0, 15), st.text(max_size=300) | st.none(), st.booleans()), max_size=60
    ),
)
def test_verdict_cache_never_exceeds_its_budget(budget: int, operations: list[tuple[int, Any, bool]]) -> None:
    """Whatever is put: accounted bytes stay within the budget, a read gives the last value put
    (or a miss), and a budget larger than everything evicts nothing."""
    from proxy.dataplane.context import MISS, VerdictCache

    cache = VerdictCache(budget)
    last: dict[bytes, Any] = {}
    for token, value, read in operations:
        digest = cache.digest(f"token-{token}")
        if read:
            got = cache.get(digest)
            if got is not MISS:
                assert got == last[digest]
            elif budget == 1 << 30:
                assert digest not in last
        else:
            cache.put(digest, (value, token))
            last[digest] = (value, token)
        assert 0 <= cache.bytes <= budget
        assert len(cache) <= len(last)


@pytest.mark.parametrize(
    ("name", "size", "accepted"),
    [("under the cap", 8_000, True), ("over the cap", 9_000, False)],
)
def test_a_valid_credential_over_8_kb_is_not_verified(
    serve: Any, name: str, size: int, accepted: bool
) -> None:
    """Refused before verification (and so never cached): the request goes on as if it had none."""
    served = serve(key_sources=VERIFIED_FIRST, jwt_secret=SECRET, telegram_bot_token=BOT_TOKEN)
    with httpx.Client() as client:
        headers = bearer({"sub": "big-jwt", "pad": "x" * (size * 3 // 4 - 60)})
        assert abs(len(headers["Authorization"]) - len("Bearer ") - size) < 200
        headers["X-User-Id"] = FALLBACK
        key, _ = served.key_of(client, f"/size/jwt/{size}", headers)
        assert key == ("big-jwt" if accepted else FALLBACK)

        init_data = telegram_init_data(4242, pad="y" * (size - 200))
        assert abs(len(init_data) - size) < 200
        key, _ = served.key_of(
            client, f"/size/tg/{size}", {"X-Telegram-Init-Data": init_data, "X-User-Id": FALLBACK}
        )
        assert key == ("4242" if accepted else FALLBACK)
    assert len(served.app.resolver.context.jwt.cache) == (1 if accepted else 0)


def test_a_hostile_init_data_hash_is_ignored_not_a_failure(serve: Any) -> None:
    served = serve(key_sources=VERIFIED_FIRST, telegram_bot_token=BOT_TOKEN)
    with httpx.Client() as client:
        key, _ = served.key_of(
            client,
            "/tg/non-ascii-hash",
            {"X-Telegram-Init-Data": "user=1&hash=%C3%A9", "X-User-Id": FALLBACK},
        )
    assert key == FALLBACK


def test_a_token_seen_before_its_nbf_works_after_it_and_expires_on_time(serve: Any) -> None:
    served = serve(key_sources=VERIFIED_FIRST, jwt_secret=SECRET)
    nbf = int(time.time()) + 2
    exp = nbf + 2
    headers = {**bearer({"sub": "early-bird", "nbf": nbf, "exp": exp}), "X-User-Id": FALLBACK}
    with httpx.Client() as client:
        assert served.key_of(client, "/nbf/before", headers)[0] == FALLBACK  # not yet valid
        wait_past(nbf)
        assert served.key_of(client, "/nbf/after", headers)[0] == "early-bird"
        assert served.key_of(client, "/nbf/cached", headers)[0] == "early-bird"
        wait_past(exp)
        assert served.key_of(client, "/nbf/expired", headers)[0] == FALLBACK  # and stays refused
        assert served.key_of(client, "/nbf/expired-again", headers)[0] == FALLBACK


def test_jwt_require_exp(serve: Any) -> None:
    strict = serve(key_sources=VERIFIED_FIRST, jwt_secret=SECRET, jwt_require_exp=True)
    lenient = serve(key_sources=VERIFIED_FIRST, jwt_secret=SECRET)  # the default: false
    without = {**bearer({"sub": "no-exp"}), "X-User-Id": FALLBACK}
    with_exp = {**bearer({"sub": "has-exp", "exp": int(time.time()) + 600}), "X-User-Id": FALLBACK}
    with httpx.Client() as client:
        assert strict.key_of(client, "/exp/strict/without", without)[0] == FALLBACK
        assert strict.key_of(client, "/exp/strict/again", without)[0] == FALLBACK
        assert strict.key_of(client, "/exp/strict/with", with_exp)[0] == "has-exp"
        assert lenient.key_of(client, "/exp/lenient/without", without)[0] == "no-exp"


def test_bad_identity_settings_are_config_errors_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[context\] identity_cache_bytes"):
        load_settings(env={"FLAGPROXY_CONTEXT_IDENTITY_CACHE_BYTES": "-1"}, origins=["http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match=r"\[context\] jwt_require_exp"):
        load_settings(env={"FLAGPROXY_CONTEXT_JWT_REQUIRE_EXP": "maybe"}, origins=["http://127.0.0.1:1"])


# --- key precedence, the signed anonymous cookie --------------------------------------------------


def test_a_verified_identity_beats_the_header_with_default_settings(serve: Any) -> None:
    served = serve(jwt_secret=SECRET, telegram_bot_token=BOT_TOKEN)
    with httpx.Client() as client:
        claimed = {"X-User-Id": "victim"}
        assert served.key_of(client, "/prec/jwt", {**bearer({"sub": "alice"}), **claimed})[0] == "alice"
        tg = {"X-Telegram-Init-Data": telegram_init_data(777), **claimed}
        assert served.key_of(client, "/prec/tg", tg)[0] == "777"
        # a caller without a verified identity still gets the header's key (it is the next source)
        assert served.key_of(client, "/prec/none", claimed)[0] == "victim"
        forged = {**bearer({"sub": "alice"}, secret="w" * 40), **claimed}
        assert served.key_of(client, "/prec/forged", forged)[0] == "victim"


def test_an_explicit_unverified_first_order_is_kept_with_a_startup_warning(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flagproxy.context")
    serve(jwt_secret=SECRET, telegram_bot_token=BOT_TOKEN)  # the default order: no warning
    assert [r for r in caplog.records if r.name == "flagproxy.context"] == []

    served = serve(jwt_secret=SECRET, key_sources=["header", "jwt"])
    warnings = [r for r in caplog.records if r.name == "flagproxy.context"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "key_sources" in message and "header" in message and "jwt" in message
    with httpx.Client() as client:
        headers = {**bearer({"sub": "alice"}), "X-User-Id": "victim"}
        assert served.key_of(client, "/prec/explicit", headers)[0] == "victim"  # the operator's order


def test_a_short_cookie_secret_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\[context\] cookie_secret"):
        load_settings(env={"FLAGPROXY_CONTEXT_COOKIE_SECRET": "short"}, origins=["http://127.0.0.1:1"])


def signature(anonymous_id: str) -> str:
    """docs/flags.md: the signature is hex HMAC-SHA256 of the id, keyed with cookie_secret."""
    return hmac.new(COOKIE_SECRET.encode(), anonymous_id.encode(), hashlib.sha256).hexdigest()


def issued_cookie(response: httpx.Response) -> str:
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 1, cookies
    match = re.fullmatch(r"flag_uid=([^;]+); Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax", cookies[0])
    assert match, cookies[0]
    return match.group(1)


def test_a_signed_anonymous_cookie_is_sticky_and_cannot_be_forged(serve: Any) -> None:
    served = serve(cookie_secret=COOKIE_SECRET)
    with httpx.Client() as client:
        key, response = served.key_of(client, "/anon/first", {})
        value = issued_cookie(response)
        anonymous_id, _, sig = value.partition(".")
        assert key == anonymous_id and re.fullmatch(r"[0-9a-f]{32}", anonymous_id)
        assert sig == signature(anonymous_id)

        for i in range(3):  # sticky: the same key, no new cookie
            again, response = served.key_of(client, f"/anon/again/{i}", {"Cookie": f"flag_uid={value}"})
            assert again == anonymous_id and "set-cookie" not in response.headers

        victim = "0123456789abcdef0123456789abcdef"
        forgeries = {
            "unsigned": victim,
            "signature of another id": f"{victim}.{sig}",
            "made-up signature": f"{victim}.{'0' * 64}",
            "truncated signature": f"{victim}.{signature(victim)[:-1]}",
            "empty id": f".{signature('')}",
        }
        for name, forged in forgeries.items():
            key, response = served.key_of(
                client, f"/anon/forged/{len(name)}", {"Cookie": f"flag_uid={forged}"}
            )
            fresh = issued_cookie(response)
            fresh_id, _, fresh_sig = fresh.partition(".")
            assert key == fresh_id != victim, name
            assert fresh_sig == signature(fresh_id), name

        # a cookie the proxy issued with this secret is accepted for any id it signed
        again, response = served.key_of(
            client, "/anon/victim", {"Cookie": f"flag_uid={victim}.{signature(victim)}"}
        )
        assert again == victim and "set-cookie" not in response.headers


@settings(max_examples=300, deadline=None)
@given(
    cookie=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=';,"'), max_size=140
    )
)
def test_no_cookie_written_without_the_secret_is_accepted(cookie: str) -> None:
    """Property: with a secret, any value a client makes up gets a fresh, signed id instead."""
    builder = ContextBuilder(dataclasses.replace(ContextSettings(), cookie_secret=COOKIE_SECRET))
    context, extra = builder.build(
        {
            "type": "http",
            "path": "/",
            "method": "GET",
            "query_string": b"",
            "headers": [(b"cookie", f"flag_uid={cookie}".encode())],
        }
    )
    assert len(extra) == 1
    issued = extra[0][1].decode().split(";")[0].removeprefix("flag_uid=")
    anonymous_id, _, sig = issued.partition(".")
    assert context["key"] == anonymous_id and sig == signature(anonymous_id) and issued != cookie
