"""The ``/flag`` grammar and every command end to end: a signed Slack slash command to a real proxy,
the change seen where it matters — the X-Feature-Flags header the origin receives, ``/api/audit``'s
actor — and the announcement received by a fake Slack incoming webhook (a real local HTTP server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    ProxyProcess,
    RawOrigin,
    RedisServer,
    audited,
    http_client,
    json_posts,
    post_slack,
    served_flags,
    slack_form,
    unique_namespace,
    wait_for,
)

from proxy.config import ChatSettings, SlackChatSettings, TelegramChatSettings
from proxy.control.chat.commands import Command, Usage, command_text, parse, reweighted
from proxy.control.chat.runtime import ChatRuntime, mrkdwn_as_html

SECRET = "slack-signing-secret-for-tests"
TOKEN = "chat-admin-token"
ADMIN, READER = "U0ADMIN", "U0READER"
THREE_WAY = {
    "variants": {
        "control": {"weight": 50, "config": {"minConfidence": 0.85}},
        "treatment_a": {"weight": 25, "config": {"minConfidence": 0.75}},
        "treatment_b": {"weight": 25, "config": {"minConfidence": 0.8}},
    },
    "defaultVariant": "control",
}
FLAGS = {
    "flags": {
        "signal-confidence-threshold": {
            **THREE_WAY,
            "experiment": {"control": "control", "goals": ["trade"], "window_hours": 72},
        },
        "weights-flag": THREE_WAY,
        "promote-flag": THREE_WAY,
        "kill-flag": THREE_WAY,
        "dark-mode": {"enabled": True},
        "checkout-v2": {"enabled": False},
        "list-alpha-one": {"enabled": True},
        "list-alpha-two": {"enabled": False},
        "list-beta": {"enabled": True},
        "rollout": {"enabled": True, "percentage": 100},
        "fish&chips": {"enabled": True},
    }
}
CONFIG = """
[[goals]]
name = "trade"
method = "POST"
path = "/api/trades/**"
"""
USERS = [f"trader-{i}" for i in range(40)]


# --- the grammar (pure) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("list", Command("list")),
        ("/flag list checkout-*", Command("list", pattern="checkout-*")),
        ("get dark-mode", Command("get", key="dark-mode")),
        ("ON dark-mode", Command("on", key="dark-mode")),
        ("off  dark-mode ", Command("off", key="dark-mode")),
        ("kill k", Command("kill", key="k")),
        ("restore k", Command("restore", key="k")),
        ("set k treatment_b 25", Command("set", key="k", variant="treatment_b", percent=25)),
        ("set k treatment_b 100%", Command("set", key="k", variant="treatment_b", percent=100)),
        ("promote k treatment_a", Command("promote", key="k", variant="treatment_a")),
        ("stats k", Command("stats", key="k")),
        ("stats k trade", Command("stats", key="k", goal="trade")),
        ("help", Command("help")),
        ("/flag@mybot help", Command("help")),
    ],
)
def test_parse(text: str, command: Command) -> None:
    assert parse(text) == command


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no command"),
        ("/flag", "no command"),
        ("launch k", "unknown command"),
        ("get", "usage: /flag get KEY"),
        ("get a b", "usage: /flag get KEY"),
        ("set k v", "usage: /flag set KEY VARIANT PERCENT"),
        ("set k v 101", "0..100"),
        ("set k v -5", "0..100"),
        ("set k v 2.5", "0..100"),
        ("stats k g extra", "usage: /flag stats KEY [GOAL]"),
        ("list " + "x" * 2000, "longer than"),
    ],
)
def test_malformed_commands_are_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(Usage) as info:
        parse(text)
    assert needle in str(info.value)


def test_command_text_is_for_this_bot_only() -> None:
    assert command_text("/flag on x") == "on x"
    assert command_text("/flag") == ""
    assert command_text("/flag@FlagBot on x", "flagbot") == "on x"  # usernames are case-insensitive
    assert command_text("/flag@otherbot on x", "flagbot") is None
    assert command_text("/flag@anybot on x") == "on x"  # no bot_username: any suffix is ours
    assert command_text("/start") is None
    assert command_text("/flagged on x") is None
    assert command_text("hello /flag on x") is None


@pytest.mark.parametrize(
    ("weights", "variant", "percent", "expected"),
    [
        # the example: treatment_b to 25 % of 100, the others keep 50:25 → 2:1
        ([("control", 50), ("treatment_a", 25), ("treatment_b", 25)], "treatment_b", 40,
         [("control", 40), ("treatment_a", 20), ("treatment_b", 40)]),
        ([("control", 50), ("treatment_a", 25), ("treatment_b", 25)], "control", 0,
         [("control", 0), ("treatment_a", 50), ("treatment_b", 50)]),
        # a total under 100 (or not a multiple of it) becomes the next multiple: every percent exact
        ([("a", 1), ("b", 1), ("c", 1)], "a", 50, [("a", 50), ("b", 25), ("c", 25)]),
        ([("a", 1), ("b", 1)], "a", 25, [("a", 25), ("b", 75)]),
        ([("a", 1), ("b", 1)], "a", 75, [("a", 75), ("b", 25)]),
        ([("a", 100), ("b", 50)], "b", 10, [("a", 180), ("b", 20)]),
        ([("a", 0), ("b", 0), ("c", 0)], "a", 50, [("a", 50), ("b", 25), ("c", 25)]),  # all 0: of 100
        ([("a", 70), ("b", 30)], "b", 100, [("a", 0), ("b", 100)]),
        ([("a", 10), ("b", 20), ("c", 70)], "a", 33, [("a", 33), ("b", 15), ("c", 52)]),
    ],
)  # fmt: skip
def test_reweighted(
    weights: list[tuple[str, int]], variant: str, percent: int, expected: list[tuple[str, int]]
) -> None:
    assert reweighted(weights, variant, percent) == expected


@given(
    st.lists(st.integers(0, 10_000), min_size=2, max_size=6),
    st.data(),
    st.integers(0, 100),
)
def test_reweighted_gives_exactly_the_percent_and_keeps_the_others_ratios(
    raw: list[int], data: st.DataObject, percent: int
) -> None:
    weights = [(f"v{i}", w) for i, w in enumerate(raw)]
    variant = data.draw(st.sampled_from([name for name, _ in weights]))
    got = dict(reweighted(weights, variant, percent))
    total = sum(got.values())
    assert total % 100 == 0 and total >= sum(raw)  # the same total when it was a multiple of 100
    assert total - sum(raw) < 100 or sum(raw) == 0  # all 0: of 100
    assert got[variant] * 100 == percent * total  # exactly PERCENT % of the traffic
    others = {name: w for name, w in weights if name != variant}
    base = sum(others.values())
    rest = total - got[variant]
    for name, w in others.items():  # each other variant within one unit of its proportional share
        share = rest * w / base if base else rest / len(others)
        assert abs(got[name] - share) < 1


def test_reweighted_refuses_what_cannot_be() -> None:
    with pytest.raises(ValueError, match="no variant 'nope'"):
        reweighted([("a", 1), ("b", 1)], "nope", 10)
    with pytest.raises(ValueError, match="only variant"):
        reweighted([("a", 5)], "a", 50)
    assert reweighted([("a", 5)], "a", 100) == [("a", 5)]


# --- end to end, through Slack ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_slack(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    """Slack's side: the incoming webhook for announcements."""
    return origin_factory()


@pytest.fixture(scope="module")
def proxy(
    origin: RawOrigin, fake_slack: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> ProxyProcess:
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": SECRET,
        "FLAGPROXY_CHAT_SLACK_ALLOWED_USERS": ADMIN,
        "FLAGPROXY_CHAT_SLACK_ANNOUNCE_WEBHOOK_URL": f"{fake_slack.url}/announce",
    }
    return proxy_factory([origin.url], flags=FLAGS, env=env, config=CONFIG)


def flag(proxy: ProxyProcess, text: str, user: str = ADMIN) -> str:
    """``/flag <text>`` from ``user``: the ephemeral reply's text."""
    response = post_slack(proxy.base_url, slack_form(text, user=user), SECRET)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response_type"] == "ephemeral"
    text_out: str = body["text"]
    return text_out


def served(proxy: ProxyProcess, origin: RawOrigin, key: str) -> list[Any]:
    return [served_flags(proxy, origin, user=u).get(key) for u in USERS]


def native_definition(proxy: ProxyProcess, key: str) -> dict[str, Any]:
    response = http_client().get(
        f"{proxy.base_url}/__flags/api/flags/{key}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200, response.text
    definition: dict[str, Any] = response.json()["definition"]
    return definition


def audit(proxy: ProxyProcess, key: str) -> list[tuple[str, str]]:
    return audited(proxy.base_url, TOKEN, key)


def announced(fake_slack: RawOrigin, needle: str) -> list[str]:
    return [p["text"] for p in json_posts(fake_slack, "/announce") if needle in p["text"]]


def test_help(proxy: ProxyProcess) -> None:
    reply = flag(proxy, "help")
    assert "/flag set KEY VARIANT PERCENT" in reply and reply.startswith("```")


def test_list_and_get(proxy: ProxyProcess) -> None:
    reply = flag(proxy, "list list-alpha-*", user=READER)  # reads need no permission
    assert "list-alpha-one [native] on" in reply and "list-alpha-two [native] off" in reply
    assert "list-beta" not in reply
    assert "list-beta" in flag(proxy, "list beta")  # a substring
    assert "no flags match" in flag(proxy, "list nothing-like-this")
    reply = flag(proxy, "get weights-flag", user=READER)
    assert "weights-flag [native] on, control 50% / treatment_a 25% / treatment_b 25%" in reply
    assert "no flag 'nope'" in flag(proxy, "get nope")


def test_off_and_on(proxy: ProxyProcess, origin: RawOrigin, fake_slack: RawOrigin) -> None:
    assert set(served(proxy, origin, "dark-mode")) == {True}
    reply = flag(proxy, "off dark-mode")
    assert reply.startswith("done: turned dark-mode off"), reply
    assert set(served(proxy, origin, "dark-mode")) == {False}
    assert audit(proxy, "dark-mode")[0] == ("off", f"slack:{ADMIN}")
    wait_for(lambda: announced(fake_slack, "turned dark-mode off"), what="the announcement")
    assert announced(fake_slack, "turned dark-mode off") == [f"@name-{ADMIN} (Slack) turned dark-mode off"]
    assert "already" in flag(proxy, "off dark-mode")  # nothing to change
    assert flag(proxy, "on dark-mode").startswith("done: turned dark-mode on")
    assert set(served(proxy, origin, "dark-mode")) == {True}


def test_set_weights(proxy: ProxyProcess, origin: RawOrigin) -> None:
    reply = flag(proxy, "set weights-flag treatment_b 100")
    assert "control 0 / treatment_a 0 / treatment_b 100" in reply, reply
    assert set(served(proxy, origin, "weights-flag")) == {"treatment_b"}
    assert audit(proxy, "weights-flag")[0] == ("set_weights", f"slack:{ADMIN}")
    reply = flag(proxy, "set weights-flag control 100")
    assert set(served(proxy, origin, "weights-flag")) == {"control"}
    assert "no variant 'treatment_z'" in flag(proxy, "set weights-flag treatment_z 10")
    assert "is a boolean flag: /flag set dark-mode true|false PERCENT" in flag(proxy, "set dark-mode on 10")
    assert set(served(proxy, origin, "weights-flag")) == {"control"}  # the refusals changed nothing


def test_set_a_boolean_flags_percentage(proxy: ProxyProcess, origin: RawOrigin) -> None:
    assert flag(proxy, "set rollout true 30").startswith("done: set rollout: true for 30%")
    assert native_definition(proxy, "rollout")["percentage"] == 30
    assert set(served(proxy, origin, "rollout")) == {True, False}
    assert flag(proxy, "set rollout false 100").startswith("done: set rollout: true for 0%")
    assert set(served(proxy, origin, "rollout")) == {False}
    assert audit(proxy, "rollout")[0] == ("set_percentage", f"slack:{ADMIN}")
    assert flag(proxy, "set rollout true 100").startswith("done")
    assert set(served(proxy, origin, "rollout")) == {True}


def test_a_promoted_boolean_reads_true(proxy: ProxyProcess) -> None:
    assert flag(proxy, "promote rollout true").startswith("done: promoted rollout to true")
    assert "PROMOTED true" in flag(proxy, "get rollout")
    assert flag(proxy, "restore rollout").startswith("done: restored rollout")


def test_slack_escaped_characters_name_the_key(proxy: ProxyProcess) -> None:
    """Slack sends ``&`` in a command's text as ``&amp;``."""
    assert "fish&amp;chips [native] on" in flag(proxy, "get fish&amp;chips")  # the reply is escaped again


def test_kill_and_restore(proxy: ProxyProcess, origin: RawOrigin) -> None:
    assert len(set(served(proxy, origin, "kill-flag"))) > 1
    assert flag(proxy, "kill kill-flag").startswith("done: killed kill-flag")
    assert set(served(proxy, origin, "kill-flag")) == {"control"}
    assert "KILLED" in flag(proxy, "get kill-flag")
    assert flag(proxy, "restore kill-flag").startswith("done: restored kill-flag")
    assert len(set(served(proxy, origin, "kill-flag"))) > 1
    assert audit(proxy, "kill-flag")[:2] == [("restore", f"slack:{ADMIN}"), ("kill", f"slack:{ADMIN}")]


def test_promote(proxy: ProxyProcess, origin: RawOrigin) -> None:
    assert "no variant 'nope'" in flag(proxy, "promote promote-flag nope")
    assert flag(proxy, "promote promote-flag treatment_a").startswith("done: promoted promote-flag")
    assert set(served(proxy, origin, "promote-flag")) == {"treatment_a"}
    assert audit(proxy, "promote-flag")[0] == ("promote", f"slack:{ADMIN}")


def test_boolean_promote_and_unknown_flag(proxy: ProxyProcess, origin: RawOrigin) -> None:
    assert flag(proxy, "promote checkout-v2 true").startswith("done: promoted checkout-v2")
    assert set(served(proxy, origin, "checkout-v2")) == {True}
    assert "no flag 'ghost'" in flag(proxy, "kill ghost")


def test_changes_need_an_allowed_user(proxy: ProxyProcess, origin: RawOrigin) -> None:
    for text in ("off list-beta", "kill list-beta", "promote list-beta false", "set list-beta x 1"):
        assert flag(proxy, text, user=READER).startswith("not allowed"), text
    assert set(served(proxy, origin, "list-beta")) == {True}
    assert audit(proxy, "list-beta") == []


def test_stats_is_the_experiments_table(proxy: ProxyProcess, origin: RawOrigin) -> None:
    for user in USERS:
        http_client().get(f"{proxy.base_url}/api/signals", headers={"X-User-Id": user})
    for user in USERS[::4]:
        http_client().post(f"{proxy.base_url}/api/trades/new", headers={"X-User-Id": user})

    def table() -> str:
        reply = flag(proxy, "stats signal-confidence-threshold trade", user=READER)
        return reply if f"{len(USERS)} users" in reply and "Goal: trade" in reply else ""

    reply = wait_for(table, timeout=10, what="the experiment's results")
    assert "Variant" in reply and "Conversion Rate" in reply and "treatment_b" in reply
    assert "(control)" in reply
    changed = flag(proxy, "set signal-confidence-threshold treatment_b 40")
    assert "control 40 / treatment_a 20 / treatment_b 40" in changed and "sample-ratio check" in changed
    assert "MISMATCH" in flag(proxy, "stats signal-confidence-threshold trade")  # exposed at 50/25/25
    assert "has no goal 'signup'" in flag(proxy, "stats signal-confidence-threshold signup")
    assert "no experiment flag 'dark-mode'" in flag(proxy, "stats dark-mode")


def test_malformed_commands_get_help_and_change_nothing(proxy: ProxyProcess, origin: RawOrigin) -> None:
    for text in ("", "launch dark-mode", "off", "set weights-flag control 500"):
        reply = flag(proxy, text)
        assert "/flag help" in reply, (text, reply)
    assert set(served(proxy, origin, "dark-mode")) == {True}
    assert [a for a in audit(proxy, "dark-mode") if a[0] == "off"] == [("off", f"slack:{ADMIN}")]


def test_flags_of_another_source_take_overrides_only(
    origin: RawOrigin, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    from test_split_e2e import FakeSplitApi, split_flag  # a fake Split API on a real local socket

    split = FakeSplitApi()
    split.thread.start()
    try:
        split.publish(split_flag("split-checkout", 100))
        env = {
            "FLAGPROXY_ADMIN_TOKEN": TOKEN,
            "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": SECRET,
            "FLAGPROXY_CHAT_SLACK_ALLOWED_USERS": ADMIN,
            "FLAGPROXY_SPLIT_SDK_KEY": "sdk-key-e2e",  # the key the fake accepts
            "FLAGPROXY_SPLIT_API_URL": split.url,
            "FLAGPROXY_SPLIT_INTERVAL_S": "3600",
        }
        proxy = proxy_factory([origin.url], env=env)
        wait_for(lambda: served_flags(proxy, origin).get("split-checkout") == "on", what="the Split pull")
        for text in ("off split-checkout", "set split-checkout on 50"):
            assert "comes from split: change it there" in flag(proxy, text), text
        assert "split-checkout [split]" in flag(proxy, "list split-")
        assert flag(proxy, "promote split-checkout off").startswith("done: promoted split-checkout")
        assert served_flags(proxy, origin)["split-checkout"] == "off"
        assert audit(proxy, "split-checkout")[0] == ("promote", f"slack:{ADMIN}")  # after the sync's upsert
    finally:
        split.server.shutdown()


def test_with_the_redis_store(
    origin: RawOrigin, redis_server: RedisServer, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": SECRET,
        "FLAGPROXY_CHAT_SLACK_ALLOWED_USERS": ADMIN,
        "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("chat"),
    }
    proxy = proxy_factory([origin.url], flags=FLAGS, env=env, args=["--redis-url", redis_server.url])
    wait_for(lambda: http_client().get(f"{proxy.base_url}/__flags/readyz").status_code == 200)
    assert flag(proxy, "off dark-mode").startswith("done: turned dark-mode off")
    assert flag(proxy, "set weights-flag treatment_a 100").startswith("done: set weights-flag")
    assert served_flags(proxy, origin)["dark-mode"] is False
    assert set(served(proxy, origin, "weights-flag")) == {"treatment_a"}
    assert audit(proxy, "weights-flag") == [("set_weights", f"slack:{ADMIN}")]


# --- one line per change in one channel -------------------------------------------------------------


def announcements(change_channel: str) -> list[tuple[str, dict[str, Any]]]:
    """Where ``ChatRuntime.announce`` posts, with a Slack webhook and a Telegram chat configured."""
    settings = ChatSettings(
        slack=SlackChatSettings(announce_webhook_url="https://hooks.example/T1/B1/x"),
        telegram=TelegramChatSettings(bot_token="1:abc", announce_chat_id="-100777", api_url="http://tg"),
    )
    runtime = ChatRuntime(settings, change_channel)
    posted: list[tuple[str, dict[str, Any]]] = []
    runtime.outbox.post = lambda url, payload, what: posted.append((url, payload)) is None  # type: ignore[method-assign]
    runtime.announce("@alice (Slack) turned dark-mode off")
    return posted


def test_announcements_skip_the_change_channel_which_tells_every_change() -> None:
    assert [url for url, _ in announcements("")] == [
        "https://hooks.example/T1/B1/x",
        "http://tg/bot1:abc/sendMessage",
    ]
    assert [url for url, _ in announcements("https://hooks.example/T1/B1/x")] == [
        "http://tg/bot1:abc/sendMessage"
    ]
    assert [url for url, _ in announcements("telegram:-100777")] == ["https://hooks.example/T1/B1/x"]
    assert len(announcements("telegram:-100888")) == 2  # another chat: both still told


def test_notices_become_telegram_html() -> None:
    text = "*flagproxy: 1 potentially stale flag*\n• `fish&amp;chips` (ops): not evaluated"
    assert mrkdwn_as_html(text) == (
        "<b>flagproxy: 1 potentially stale flag</b>\n• <code>fish&amp;chips</code> (ops): not evaluated"
    )
