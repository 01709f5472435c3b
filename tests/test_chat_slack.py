"""``POST /__flags/chat/slack``: Slack's request signing (valid, stale, bad, replayed), who may change
flags, and slow work answered through ``response_url`` — a fake Slack on a real local socket."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from support import (
    ProxyProcess,
    RawOrigin,
    audited,
    http_client,
    json_posts,
    post_slack,
    served_flags,
    slack_form,
    slack_signature,
    wait_for,
)

from proxy.control.chat.runtime import SeenSignatures
from proxy.control.chat.slack import expected_signature

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TOKEN = "slack-test-admin-token"
FLAGS = {"flags": {f"f{i}": {"enabled": True} for i in range(8)}}
ADMIN = "U0ADMIN"


def test_slacks_documented_test_vector() -> None:
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert expected_signature(SECRET, "1531420618", body) == expected
    assert slack_signature(SECRET, "1531420618", body) == expected  # the tests' own signer agrees


@pytest.fixture(scope="module")
def fake_slack(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    return origin_factory()


def env(**extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": SECRET,
        "FLAGPROXY_CHAT_SLACK_ALLOWED_USERS": f"{ADMIN},U0OTHER",
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory([origin.url], flags=FLAGS, env=env())


def audit_actions(proxy: ProxyProcess, key: str) -> list[tuple[str, str]]:
    return audited(proxy.base_url, TOKEN, key)


def test_a_valid_signed_command_is_applied(proxy: ProxyProcess, origin: RawOrigin) -> None:
    response = post_slack(proxy.base_url, slack_form("off f0"), SECRET)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"response_type": "ephemeral", "text": response.json()["text"]}
    assert response.json()["text"].startswith("done: turned f0 off")
    assert served_flags(proxy, origin)["f0"] is False
    assert audit_actions(proxy, "f0") == [("off", f"slack:{ADMIN}")]


@pytest.mark.parametrize("age_s", [301, -301, 3600])
def test_a_stale_timestamp_is_refused(proxy: ProxyProcess, origin: RawOrigin, age_s: int) -> None:
    response = post_slack(proxy.base_url, slack_form("off f1"), SECRET, timestamp=int(time.time()) - age_s)
    assert response.status_code == 401
    assert response.json()["error"] == "signature_expired"
    assert served_flags(proxy, origin)["f1"] is True
    assert audit_actions(proxy, "f1") == []


@pytest.mark.parametrize(
    "signature",
    ["", "v0=", "v0=" + "0" * 64, "v1=whatever", slack_signature("another-secret", "0", b"")],
)
def test_a_bad_signature_is_refused(proxy: ProxyProcess, origin: RawOrigin, signature: str) -> None:
    response = post_slack(proxy.base_url, slack_form("off f2"), SECRET, signature=signature)
    assert response.status_code == 401
    assert response.json()["error"] == "bad_signature"
    assert served_flags(proxy, origin)["f2"] is True


def test_a_signature_over_another_body_is_refused(proxy: ProxyProcess, origin: RawOrigin) -> None:
    stamp = int(time.time())
    signed_for = slack_signature(SECRET, str(stamp), slack_form("get f2"))
    response = post_slack(proxy.base_url, slack_form("off f2"), SECRET, timestamp=stamp, signature=signed_for)
    assert response.status_code == 401
    assert served_flags(proxy, origin)["f2"] is True


def test_a_missing_or_malformed_timestamp_is_refused(proxy: ProxyProcess) -> None:
    body = slack_form("help")
    for headers in ({}, {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=x"}):
        response = http_client().post(f"{proxy.base_url}/__flags/chat/slack", content=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "bad_signature"


def test_a_replayed_request_is_refused_and_applies_once(proxy: ProxyProcess, origin: RawOrigin) -> None:
    body, stamp = slack_form("kill f3"), int(time.time())
    first = post_slack(proxy.base_url, body, SECRET, timestamp=stamp)
    assert first.status_code == 200 and first.json()["text"].startswith("done: killed f3")
    post_slack(proxy.base_url, slack_form("restore f3"), SECRET)
    replay = post_slack(proxy.base_url, body, SECRET, timestamp=stamp)
    assert replay.status_code == 401
    assert replay.json()["error"] == "replayed"
    assert served_flags(proxy, origin)["f3"] is True  # the restore stands
    assert audit_actions(proxy, "f3") == [("restore", f"slack:{ADMIN}"), ("kill", f"slack:{ADMIN}")]


def test_unknown_users_and_channels_may_read_only(
    origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env=env(FLAGPROXY_CHAT_SLACK_ALLOWED_CHANNELS="C0OPS"))
    for user, channel in (("U0STRANGER", "C0OPS"), (ADMIN, "C0RANDOM")):
        reply = post_slack(proxy.base_url, slack_form("off f4", user=user, channel=channel), SECRET).json()
        assert reply["text"].startswith("not allowed"), (user, channel)
        reply = post_slack(proxy.base_url, slack_form("get f4", user=user, channel=channel), SECRET).json()
        assert reply["text"].startswith("```\nf4 [native] on")
    assert served_flags(proxy, origin)["f4"] is True
    ok = post_slack(proxy.base_url, slack_form("off f4", user=ADMIN, channel="C0OPS"), SECRET).json()
    assert ok["text"].startswith("done")
    assert served_flags(proxy, origin)["f4"] is False


def test_nobody_may_change_flags_without_allowed_users(
    origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env=env(FLAGPROXY_CHAT_SLACK_ALLOWED_USERS=""))
    assert post_slack(proxy.base_url, slack_form("off f5"), SECRET).json()["text"].startswith("not allowed")
    assert "f5 [native] on" in post_slack(proxy.base_url, slack_form("list f5"), SECRET).json()["text"]
    assert served_flags(proxy, origin)["f5"] is True


def test_slow_work_is_acknowledged_then_posted_to_response_url(
    origin: RawOrigin, fake_slack: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env=env(FLAGPROXY_CHAT_SLACK_REPLY_WITHIN_S="0"))
    response_url = f"{fake_slack.url}/commands/T0TEAM/1/secret"
    body = slack_form("off f6", response_url=response_url)
    started = time.monotonic()
    response = post_slack(proxy.base_url, body, SECRET)
    assert time.monotonic() - started < 3.0  # Slack's limit
    assert response.status_code == 200
    assert response.json() == {"response_type": "ephemeral", "text": "working on `/flag off`…"}
    posts = wait_for(
        lambda: json_posts(fake_slack, "/commands/T0TEAM/1/secret"), what="the response_url post"
    )
    assert posts == [{"response_type": "ephemeral", "text": posts[0]["text"], "replace_original": False}]
    assert posts[0]["text"].startswith("done: turned f6 off")
    assert served_flags(proxy, origin)["f6"] is False


def test_a_malformed_command_gets_help(proxy: ProxyProcess, origin: RawOrigin) -> None:
    reply = post_slack(proxy.base_url, slack_form("turn f7 off"), SECRET).json()
    assert "unknown command 'turn'" in reply["text"] and "/flag help" in reply["text"]
    assert served_flags(proxy, origin)["f7"] is True


def test_an_oversized_body_is_refused(proxy: ProxyProcess) -> None:
    response = post_slack(proxy.base_url, slack_form("help", filler="x" * 20000), SECRET)
    assert response.status_code == 413


def test_without_a_signing_secret_the_endpoint_is_absent(
    origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS)
    response = post_slack(proxy.base_url, slack_form("off f0"), SECRET)
    assert response.status_code == 404
    assert response.json() == {
        "error": "not_found",
        "detail": "Slack commands are disabled: set [chat.slack] signing_secret",
    }


def test_only_post(proxy: ProxyProcess) -> None:
    response = http_client().get(f"{proxy.base_url}/__flags/chat/slack")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_a_future_dated_signature_is_remembered_until_its_timestamp_expires() -> None:
    """A timestamp up to 300 s ahead is accepted, and stays acceptable until 300 s after it: the
    signature must be remembered for 600 s, or it can be replayed once the first 300 s pass."""
    seen = SeenSignatures()
    assert seen.first_time("v0=abc", now=1000.0)
    assert not seen.first_time("v0=abc", now=1305.0)
    assert not seen.first_time("v0=abc", now=1599.0)
    assert seen.first_time("v0=abc", now=1601.0)  # by now its timestamp is out of the window
