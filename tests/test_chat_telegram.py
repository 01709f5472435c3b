"""``POST /__flags/chat/telegram``: the Bot API webhook — the secret token, update_id de-duplication,
``/flag@bot`` in groups, who may change flags — against a fake Bot API on a real local socket that
records every ``sendMessage``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import (
    ProxyProcess,
    RawOrigin,
    RedisServer,
    audited,
    http_client,
    http_response,
    json_posts,
    never_reply,
    post_telegram,
    served_flags,
    telegram_update,
    unique_namespace,
    wait_for,
)

SECRET = "telegram-secret_token-1"
BOT_TOKEN = "123456:TEST-bot-token"
TOKEN = "telegram-test-admin-token"
ADMIN, STRANGER, GROUP, ANNOUNCE = 4242, 777, -100123, -100999
SEND = f"/bot{BOT_TOKEN}/sendMessage"
FLAGS = {
    "flags": {
        **{f"t{i}": {"enabled": True} for i in range(8)},
        "layout": {"variants": {"a": {"weight": 50}, "b": {"weight": 50}}, "defaultVariant": "a"},
    }
}


@pytest.fixture(scope="module")
def bot_api(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    api = origin_factory()
    api.default = http_response(200, [("Content-Type", "application/json")], b'{"ok":true,"result":{}}')
    return api


@pytest.fixture(scope="module")
def proxy(origin: RawOrigin, bot_api: RawOrigin, proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_SECRET_TOKEN": SECRET,
        "FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_BOT_USERNAME": "flagproxy_bot",
        "FLAGPROXY_CHAT_TELEGRAM_API_URL": bot_api.url,
        "FLAGPROXY_CHAT_TELEGRAM_ALLOWED_USERS": str(ADMIN),
        "FLAGPROXY_CHAT_TELEGRAM_ANNOUNCE_CHAT_ID": str(ANNOUNCE),
    }
    return proxy_factory([origin.url], flags=FLAGS, env=env)


def replies_to(bot_api: RawOrigin, chat: int, needle: str = "") -> list[dict[str, Any]]:
    return [p for p in json_posts(bot_api, SEND) if p["chat_id"] == chat and needle in p["text"]]


def send(proxy: ProxyProcess, update: dict[str, Any], token: str | None = SECRET) -> dict[str, Any]:
    response = post_telegram(proxy.base_url, update, token)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def audit(proxy: ProxyProcess, key: str) -> list[tuple[str, str]]:
    return audited(proxy.base_url, TOKEN, key)


def test_a_command_is_applied_and_answered(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    update = telegram_update("/flag off t0", user=ADMIN)
    assert send(proxy, update) == {"status": "accepted", "update_id": update["update_id"]}
    replies = wait_for(lambda: replies_to(bot_api, ADMIN, "t0"), what="the sendMessage reply")
    assert replies[0]["text"].startswith("done: turned t0 off")
    assert replies[0]["reply_parameters"]["message_id"] == update["message"]["message_id"]
    assert served_flags(proxy, origin)["t0"] is False
    assert audit(proxy, "t0") == [("off", f"telegram:{ADMIN}")]
    announcement = wait_for(lambda: replies_to(bot_api, ANNOUNCE, "t0"), what="the announcement")
    assert announcement[0]["text"] == f"@user{ADMIN} (Telegram) turned t0 off"


@pytest.mark.parametrize("token", [None, "", "wrong", SECRET + "x", SECRET.upper()])
def test_a_wrong_secret_token_is_refused(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin, token: str | None
) -> None:
    response = post_telegram(proxy.base_url, telegram_update("/flag off t1", user=ADMIN), token)
    assert response.status_code == 401
    assert response.json()["error"] == "bad_token"
    assert served_flags(proxy, origin)["t1"] is True
    assert audit(proxy, "t1") == []


def test_a_duplicate_update_id_applies_once(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    kill = telegram_update("/flag kill t2", user=ADMIN)
    assert send(proxy, kill)["status"] == "accepted"
    wait_for(lambda: replies_to(bot_api, ADMIN, "killed t2"), what="the kill's reply")
    send(proxy, telegram_update("/flag restore t2", user=ADMIN))
    wait_for(lambda: replies_to(bot_api, ADMIN, "restored t2"), what="the restore's reply")
    assert send(proxy, kill) == {"status": "duplicate", "update_id": kill["update_id"]}  # Telegram's retry
    assert served_flags(proxy, origin)["t2"] is True  # the restore stands
    assert audit(proxy, "t2") == [("restore", f"telegram:{ADMIN}"), ("kill", f"telegram:{ADMIN}")]
    assert len(replies_to(bot_api, ADMIN, "killed t2")) == 1


def test_a_group_command_addressed_to_the_bot(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    update = telegram_update(
        "/flag@flagproxy_bot promote layout b", user=ADMIN, chat=GROUP, chat_type="supergroup"
    )
    assert send(proxy, update)["status"] == "accepted"
    reply = wait_for(lambda: replies_to(bot_api, GROUP, "layout"), what="the reply in the group")
    assert reply[0]["text"].startswith("done: promoted layout to b")
    assert {served_flags(proxy, origin, user=f"u{i}")["layout"] for i in range(12)} == {"b"}


def test_commands_for_other_bots_and_plain_text_are_ignored(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    for text in ("/flag@some_other_bot off t3", "/start", "hello", "flag off t3"):
        update = telegram_update(text, user=ADMIN, chat=GROUP, chat_type="group")
        assert send(proxy, update) == {"status": "ignored", "update_id": update["update_id"]}
    no_message = {"update_id": 1, "edited_message": {"text": "/flag off t3"}}
    assert send(proxy, no_message)["status"] == "ignored"
    assert served_flags(proxy, origin)["t3"] is True
    assert replies_to(bot_api, GROUP, "t3") == []


def test_a_stranger_may_read_but_not_change(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    send(proxy, telegram_update("/flag off t4", user=STRANGER))
    refused = wait_for(lambda: replies_to(bot_api, STRANGER, "not allowed"), what="the refusal")
    assert "allowed_users" in refused[0]["text"]
    send(proxy, telegram_update("/flag get t4", user=STRANGER))
    got = wait_for(lambda: replies_to(bot_api, STRANGER, "t4 [native] on"), what="the read")
    assert got[0]["parse_mode"] == "HTML" and got[0]["text"].startswith("<pre>")
    assert served_flags(proxy, origin)["t4"] is True
    assert audit(proxy, "t4") == []


def test_a_malformed_command_is_answered_with_help(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    send(proxy, telegram_update("/flag set t5 on", user=ADMIN))
    reply = wait_for(lambda: replies_to(bot_api, ADMIN, "usage: /flag set KEY VARIANT PERCENT"), what="help")
    assert "/flag help" in reply[0]["text"]
    assert served_flags(proxy, origin)["t5"] is True


def test_a_failing_command_is_still_200_and_says_why(proxy: ProxyProcess, bot_api: RawOrigin) -> None:
    update = telegram_update("/flag kill no-such-flag", user=ADMIN)
    assert send(proxy, update)["status"] == "accepted"
    reply = wait_for(lambda: replies_to(bot_api, ADMIN, "no-such-flag"), what="the refusal")
    assert reply[0]["text"].startswith("no flag 'no-such-flag'")


def test_a_body_that_is_no_update_is_400(proxy: ProxyProcess) -> None:
    for body in ({"message": {}}, {"update_id": "7"}, [1]):
        response = post_telegram(proxy.base_url, body, SECRET)
        assert response.status_code == 400
        assert response.json()["error"] == "bad_update"


def test_without_a_secret_token_the_endpoint_is_absent(
    origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env={"FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": BOT_TOKEN})
    response = post_telegram(proxy.base_url, telegram_update("/flag off t6", user=ADMIN), SECRET)
    assert response.status_code == 404
    assert response.json() == {
        "error": "not_found",
        "detail": "Telegram commands are disabled: set [chat.telegram] secret_token",
    }
    assert served_flags(proxy, origin)["t6"] is True


def test_a_change_made_in_the_announce_chat_is_told_there_once(
    proxy: ProxyProcess, origin: RawOrigin, bot_api: RawOrigin
) -> None:
    update = telegram_update("/flag@flagproxy_bot off t7", user=ADMIN, chat=ANNOUNCE, chat_type="supergroup")
    send(proxy, update)
    wait_for(lambda: replies_to(bot_api, ANNOUNCE, "done: turned t7 off"), what="the reply")
    send(proxy, telegram_update("/flag on t7", user=ADMIN))  # from elsewhere: announced there
    wait_for(lambda: replies_to(bot_api, ANNOUNCE, "turned t7 on"), what="the announcement")
    told = [p["text"] for p in replies_to(bot_api, ANNOUNCE, "t7")]
    assert len(told) == 2, (
        told
    )  # the reply, and the later change's announcement: no announcement of the first
    assert told[0].startswith("done: turned t7 off") and told[1] == f"@user{ADMIN} (Telegram) turned t7 on"
    assert served_flags(proxy, origin)["t7"] is True


def test_a_retry_to_another_instance_applies_nothing(
    origin: RawOrigin,
    bot_api: RawOrigin,
    redis_server: RedisServer,
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    """Two instances on one Redis: the update_id rides with the change into the store, so a retry that a
    load balancer sends to the other instance is a duplicate there too."""
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_SECRET_TOKEN": SECRET,
        "FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_API_URL": bot_api.url,
        "FLAGPROXY_CHAT_TELEGRAM_ALLOWED_USERS": str(ADMIN),
        "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("chat-telegram"),
    }
    one, two = (
        proxy_factory([origin.url], flags=FLAGS, env=env, args=["--redis-url", redis_server.url])
        for _ in range(2)
    )
    for proxy in (one, two):
        wait_for(lambda p=proxy: http_client().get(f"{p.base_url}/__flags/readyz").status_code == 200)
    kill = telegram_update("/flag kill layout", user=ADMIN, chat=5151)
    send(one, kill)
    wait_for(lambda: replies_to(bot_api, 5151, "done: killed layout"), what="the first delivery's reply")
    send(one, telegram_update("/flag restore layout", user=ADMIN, chat=5151))
    wait_for(lambda: replies_to(bot_api, 5151, "done: restored layout"), what="the restore's reply")
    assert send(two, kill)["status"] == "accepted"  # this instance has not seen it
    reply = wait_for(lambda: replies_to(bot_api, 5151, "already done"), what="the retry's reply")
    assert "applied before" in reply[0]["text"]
    assert len({served_flags(two, origin, user=f"u{i}")["layout"] for i in range(12)}) == 2  # restored
    assert audit(one, "layout") == [("restore", f"telegram:{ADMIN}"), ("kill", f"telegram:{ADMIN}")]


def test_change_notices_on_a_telegram_channel_are_sent_by_the_bot(
    origin: RawOrigin, bot_api: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """``[alerts] change_channel = "telegram:<chat id>"``: an admin change reaches that chat."""
    notices = -100555
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_API_URL": bot_api.url,
        "FLAGPROXY_ALERTS_CHANGE_CHANNEL": f"telegram:{notices}",
    }
    noticed = proxy_factory([origin.url], flags=FLAGS, env=env)
    response = http_client().post(
        f"{noticed.base_url}/__flags/api/flags/layout/kill", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200, response.text
    sent = wait_for(lambda: replies_to(bot_api, notices, "layout"), timeout=10, what="the change notice")
    assert len(sent) == 1
    assert sent[0]["parse_mode"] == "HTML"  # the notice's `code` span as a tag, not literal backticks
    assert "<code>layout</code>" in sent[0]["text"] and "`" not in sent[0]["text"]


def test_no_room_to_run_a_command_is_503_and_its_retry_runs(
    origin: RawOrigin, origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """With ``[chat] max_pending`` posts waiting, an update is not recorded as seen: Telegram's retry
    (it retries a non-2xx) must not be answered "duplicate" and dropped."""
    stuck = origin_factory()
    stuck.default = never_reply()  # the Bot API never answers: the first reply holds the one slot
    env = {
        "FLAGPROXY_CHAT_TELEGRAM_SECRET_TOKEN": SECRET,
        "FLAGPROXY_CHAT_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "FLAGPROXY_CHAT_TELEGRAM_API_URL": stuck.url,
        "FLAGPROXY_CHAT_TELEGRAM_ALLOWED_USERS": str(ADMIN),
        "FLAGPROXY_CHAT_MAX_PENDING": "1",
        "FLAGPROXY_CHAT_TIMEOUT_S": "60",
    }
    busy = proxy_factory([origin.url], flags=FLAGS, env=env)
    assert send(busy, telegram_update("/flag get layout", user=ADMIN))["status"] == "accepted"
    wait_for(lambda: stuck.requests_to(SEND), what="the first reply, never answered")
    change = telegram_update("/flag kill layout", user=ADMIN)
    for _ in range(2):  # the retry is refused the same way, not answered "duplicate"
        response = post_telegram(busy.base_url, change, SECRET)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "busy" and response.headers["retry-after"] == "5"
    assert len({served_flags(busy, origin, user=f"u{i}")["layout"] for i in range(12)}) == 2  # not killed
