"""Slack alerts for the header budget: ``Alerter`` against a mocked Slack (respx), and end to end.

The sender's sleeps are recorded instead of slept (``clock`` fixture), and the dedup clock is a
fake, so nothing here waits on wall-clock time. The end-to-end test puts a Slack that never
answers behind the real proxy and checks that proxied requests do not notice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from support import LOCALHOST, ProxyProcess, RawOrigin, http_client, never_reply

from proxy import alerts
from proxy.alerts import MAX_ATTEMPTS, Alert, Alerter, retry_after
from proxy.config import AlertSettings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SLACK = "https://hooks.slack.test/services/T000/B000/XXXX"
REAL_SLEEP = asyncio.sleep


def alert(route: str = "/big/**", condition: str = "trimmed", **kw: Any) -> Alert:
    values: dict[str, Any] = {
        "condition": condition,
        "origin": "http://127.0.0.1:9000",
        "route": route,
        "used": 9700,
        "budget": 9728,
        "largest": [("big-001", 400), ("big-002", 390)],
        "omitted": ["big-003 (config)"],
        "request_id": "req-1",
    }
    values.update(kw)
    return Alert(**values)


class Clock:
    """Stands in for ``time`` (dedup cooldown) and records the sender's ``asyncio.sleep`` delays."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.sleeps.append(delay)
        await REAL_SLEEP(0)
        return result


class AsyncioWithClock:
    """``asyncio`` as proxy.alerts sees it, with ``sleep`` recorded instead of slept."""

    def __init__(self, clock: Clock) -> None:
        self.sleep = clock.sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(alerts, "time", fake)
    monkeypatch.setattr(alerts, "asyncio", AsyncioWithClock(fake))
    return fake


@pytest.fixture
def slack_mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mock:
        yield mock


def make(**kw: Any) -> Alerter:
    # Unpaced unless a test asks for pacing: the recorded sleeps are then only retries.
    settings: dict[str, Any] = {
        "slack_webhook_url": SLACK,
        "cooldown_s": 600.0,
        "queue_size": 100,
        "max_per_second": 1e9,
    }
    settings.update(kw)
    return Alerter(AlertSettings(**settings))


def posted(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


# --- the message --------------------------------------------------------------------------------------


async def test_message_has_text_and_blocks_with_everything_the_issue_asks_for() -> None:
    message = alert().message()
    assert set(message) == {"text", "blocks"}
    text = message["text"]
    assert "http://127.0.0.1:9000" in text and "/big/**" in text
    assert "9,700 of 9,728 bytes (100 %)" in text and "trimmed" in text
    blocks = json.dumps(message["blocks"])
    for part in ("*Origin*", "*Route*", "`/big/**`", "9,700 / 9,728", "*Condition*", "`big-001` 400 B"):
        assert part in blocks, part
    assert "`big-003 (config)`" in blocks
    assert message["blocks"][-1] == {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": "request id req-1"}],
    }
    many = alert(omitted=[f"k{i}" for i in range(25)]).message()
    assert "and 5 more" in json.dumps(many["blocks"])
    preflight = alert(condition="preflight", request_id="").message()
    assert "pre-flight" in preflight["text"]
    assert all(b["type"] != "context" for b in preflight["blocks"])


async def test_client_supplied_text_cannot_ping_or_link_in_slack() -> None:
    """The request id comes from the client's X-Request-Id: Slack control sequences are escaped."""
    message = alert(request_id="<!channel> <https://evil.example|click> & co", route="/a/<b>/**").message()
    dumped = json.dumps(message)
    assert "<!channel>" not in dumped and "<https://evil.example" not in dumped
    assert "request id &lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; co" in dumped
    assert "`/a/&lt;b&gt;/**`" in dumped and "/a/&lt;b&gt;/**" in message["text"]


async def test_retry_after_parsing() -> None:
    def response(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={} if value is None else {"Retry-After": value})

    assert retry_after(response("7")) == 7.0
    assert retry_after(response("0.5")) == 0.5
    assert retry_after(response("3600")) == alerts.MAX_RETRY_AFTER_S  # capped
    assert retry_after(response("-3")) == 0.0
    assert retry_after(response("Wed, 21 Oct 2026 07:28:00 GMT")) == 1.0  # a date: a short default
    assert retry_after(response(None)) == 1.0


# --- sending ----------------------------------------------------------------------------------------


async def test_sent_once_with_the_message_as_json(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(200, text="ok"))
    alerter = make()
    await alerter.start()
    assert alerter.notify(alert())
    await alerter.close()
    assert posted(route) == [alert().message()]
    assert route.calls[0].request.headers["content-type"] == "application/json"
    assert (alerter.stats.sent, alerter.stats.failed, clock.sleeps) == (1, 0, [])


async def test_429_retry_after_is_honoured_then_sent_once(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}, text="rate_limited"),
            httpx.Response(200, text="ok"),
        ]
    )
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    await alerter.close()
    assert route.call_count == 2
    assert (alerter.stats.sent, alerter.stats.failed) == (1, 0)
    assert clock.sleeps == [7.0]  # waited what Slack asked for, once


async def test_429_every_time_gives_up_and_counts_a_failure(
    clock: Clock, slack_mock: respx.MockRouter
) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(429, headers={"Retry-After": "2"}))
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    await alerter.close()
    assert route.call_count == MAX_ATTEMPTS
    assert (alerter.stats.sent, alerter.stats.failed) == (0, 1)
    assert clock.sleeps == [2.0] * (MAX_ATTEMPTS - 1)


async def test_500_is_retried_then_counted_failed(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(500, text="oops"))
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    await alerter.close()
    assert route.call_count == MAX_ATTEMPTS
    assert (alerter.stats.sent, alerter.stats.failed) == (0, 1)
    assert len(clock.sleeps) == MAX_ATTEMPTS - 1 and all(d > 0 for d in clock.sleeps)


async def test_503_then_200_is_sent(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(side_effect=[httpx.Response(503), httpx.Response(200)])
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    await alerter.close()
    assert (route.call_count, alerter.stats.sent, alerter.stats.failed) == (2, 1, 0)


@pytest.mark.parametrize(
    "error",
    [httpx.ReadTimeout("timed out"), httpx.ConnectTimeout("timed out"), httpx.ConnectError("refused")],
    ids=["read-timeout", "connect-timeout", "connect-error"],
)
async def test_timeouts_and_connect_errors_are_counted_failed(
    error: Exception, clock: Clock, slack_mock: respx.MockRouter
) -> None:
    # every attempt for the first alert fails; the sender is still alive for the second one
    route = slack_mock.post(SLACK).mock(side_effect=[error] * MAX_ATTEMPTS + [httpx.Response(200)])
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    alerter.notify(alert(route="/other/**"))
    await alerter.close()
    assert route.call_count == MAX_ATTEMPTS + 1
    assert (alerter.stats.sent, alerter.stats.failed) == (1, 1)
    assert len(clock.sleeps) == MAX_ATTEMPTS - 1
    assert "/other/**" in posted(route)[-1]["text"]


@pytest.mark.parametrize("status", [400, 403, 404, 410])
async def test_4xx_is_not_retried(status: int, clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(status, text="invalid_payload"))
    alerter = make()
    await alerter.start()
    alerter.notify(alert())
    await alerter.close()
    assert (route.call_count, alerter.stats.sent, alerter.stats.failed, clock.sleeps) == (1, 0, 1, [])


async def test_one_failure_does_not_stop_the_next_alerts(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(
        side_effect=[httpx.Response(400), httpx.Response(200), RuntimeError("boom"), httpx.Response(200)]
    )
    alerter = make()
    await alerter.start()
    for i in range(4):
        alerter.notify(alert(route=f"/r{i}/**"))
    await alerter.close()
    assert route.call_count == 4
    assert (alerter.stats.sent, alerter.stats.failed) == (2, 2)
    assert [m["blocks"][1]["fields"][1]["text"] for m in posted(route)] == [
        f"*Route*\n`/r{i}/**`" for i in range(4)
    ]


# --- dedup, cooldown, queue ---------------------------------------------------------------------------


async def test_dedup_per_origin_route_and_condition_with_cooldown(
    clock: Clock, slack_mock: respx.MockRouter
) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(200))
    alerter = make(cooldown_s=600)
    await alerter.start()
    assert alerter.notify(alert())
    for used in (9000, 9100, 9200):  # same origin, route and condition: suppressed
        assert not alerter.notify(alert(used=used, request_id=f"r{used}"))
    assert alerter.notify(alert(condition="near_limit"))  # another condition
    assert alerter.notify(alert(route="/near/**"))  # another route
    assert alerter.notify(alert(origin="http://127.0.0.1:9001"))  # another origin
    clock.now += 599.9
    assert not alerter.notify(alert())
    clock.now += 0.2  # the cooldown is over
    assert alerter.notify(alert(request_id="after-cooldown"))
    assert not alerter.notify(alert())
    await alerter.close()
    assert alerter.stats.suppressed == 5
    assert alerter.stats.by_condition == {"trimmed": 4, "near_limit": 1}
    sent = posted(route)
    assert len(sent) == alerter.stats.sent == 5
    assert "request id after-cooldown" in json.dumps(sent[-1])


async def test_zero_cooldown_sends_every_time(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(200))
    alerter = make(cooldown_s=0)
    await alerter.start()
    for _ in range(3):
        assert alerter.notify(alert())
    await alerter.close()
    assert (route.call_count, alerter.stats.suppressed) == (3, 0)


async def test_without_a_webhook_url_nothing_is_queued(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.route().mock(return_value=httpx.Response(200))
    alerter = make(slack_webhook_url="")
    await alerter.start()
    assert alerter.notify(alert())
    assert not alerter.notify(alert())  # still deduplicated (the log line)
    await alerter.close()
    assert route.call_count == 0 and alerter.stats.sent == 0
    assert alerter.stats.by_condition == {"trimmed": 1}


async def test_full_queue_drops_and_counts_and_the_drop_does_not_start_the_cooldown(
    clock: Clock, slack_mock: respx.MockRouter
) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(200))
    alerter = make(queue_size=2)  # the sender is not started yet: nothing leaves the queue
    assert alerter.notify(alert(route="/a/**"))
    assert alerter.notify(alert(route="/b/**"))
    assert not alerter.notify(alert(route="/c/**"))
    assert not alerter.notify(alert(route="/d/**"))
    assert not alerter.notify(alert(route="/c/**"))  # dropped again, not "suppressed": it was never sent
    assert (alerter.stats.dropped, alerter.stats.suppressed) == (3, 0)
    await alerter.start()
    deadline = time.monotonic() + 5
    while alerter.stats.sent < 2:  # bounded polling: /a and /b leave the queue
        assert time.monotonic() < deadline, alerter.stats
        await REAL_SLEEP(0.005)
    assert alerter.notify(alert(route="/c/**"))  # room again: /c gets its alert after all
    await alerter.close()
    routes = [m["blocks"][1]["fields"][1]["text"] for m in posted(route)]
    assert routes == ["*Route*\n`/a/**`", "*Route*\n`/b/**`", "*Route*\n`/c/**`"]
    assert (alerter.stats.sent, alerter.stats.dropped) == (3, 3)


async def test_close_flushes_what_is_queued(clock: Clock, slack_mock: respx.MockRouter) -> None:
    route = slack_mock.post(SLACK).mock(return_value=httpx.Response(200))
    alerter = make()
    for i in range(5):
        alerter.notify(alert(route=f"/q{i}/**"))
    await alerter.start()
    await alerter.close()
    assert route.call_count == alerter.stats.sent == 5


async def test_close_is_bounded_when_slack_hangs(origin_factory: Callable[..., RawOrigin]) -> None:
    """A real socket that never answers: close() gives up after its flush timeout."""
    hanging = origin_factory()
    hanging.route("/hang", never_reply())
    alerter = make(slack_webhook_url=f"{hanging.url}/hang", timeout_s=30)
    await alerter.start()
    alerter.notify(alert())
    await asyncio.to_thread(hanging.wait_until, lambda o: o.heads_received >= 1, 10)
    started = time.monotonic()
    await alerter.close(flush_timeout_s=0.2)
    assert time.monotonic() - started < 5  # loose: the flush timeout, not Slack's 30 s
    assert alerter.stats.sent == 0


# --- end to end: a hanging Slack never slows a proxied request -------------------------------------

TRIM_FLAGS = {
    "flags": {
        f"cfg-{i:02d}": {"priority": i, "variants": {"v": {"weight": 1, "config": {"pad": "p" * 80}}}}
        for i in range(30)
    }
}
TRIM_ENV = {"FLAGPROXY_HEADER_LIMIT_BYTES": "1500", "FLAGPROXY_HEADER_RESERVE_BYTES": "0"}
REQUESTS = 300


def timed_requests(proxy: ProxyProcess, origin: RawOrigin, tag: str) -> tuple[float, float]:
    """(total seconds, slowest request) for REQUESTS distinct URLs, every one trimmed at the origin."""
    client = http_client()
    slowest = 0.0
    started = time.monotonic()
    for i in range(REQUESTS):
        t0 = time.monotonic()
        response = client.get(f"{proxy.base_url}/{tag}/item-{i}", headers={"X-User-Id": "u"}, timeout=10)
        slowest = max(slowest, time.monotonic() - t0)
        assert response.status_code == 200
    total = time.monotonic() - started
    prefix = f"/{tag}/".encode()
    trimmed = [r for r in origin.requests if r.path.startswith(prefix)]
    assert len(trimmed) == REQUESTS
    assert all(r.value("X-Feature-Flags-Omitted") for r in trimmed)
    assert all(len(r.head) <= 1500 for r in trimmed)
    return total, slowest


async def test_a_hanging_slack_does_not_slow_proxied_requests(
    origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    origin = origin_factory()
    hanging = origin_factory()
    hanging.route("/hook", never_reply())
    quiet = proxy_factory([origin.url], flags=TRIM_FLAGS, env=TRIM_ENV)
    alerting = proxy_factory(
        [origin.url],
        flags=TRIM_FLAGS,
        env={
            **TRIM_ENV,
            "FLAGPROXY_ALERTS_SLACK_WEBHOOK_URL": f"{hanging.url}/hook",
            "FLAGPROXY_ALERTS_COOLDOWN_S": "0",  # every request raises an alert: the queue fills up
            "FLAGPROXY_ALERTS_QUEUE_SIZE": "10",
            "FLAGPROXY_ALERTS_TIMEOUT_S": "30",
        },
    )
    base_total, _ = await asyncio.to_thread(timed_requests, quiet, origin, "quiet")
    total, slowest = await asyncio.to_thread(timed_requests, alerting, origin, "alerting")
    # the alerter did try Slack, and Slack never answered
    assert hanging.wait_until(lambda o: o.heads_received >= 1)
    assert hanging.requests_to("/hook") and hanging.open_connections >= 1
    print(f"\n{REQUESTS} requests: {base_total:.2f} s without alerts, {total:.2f} s with a hanging Slack")
    assert total < 3 * base_total + 2.0  # loose: same order of magnitude, nothing waits on Slack
    assert slowest < 2.0
    assert "alert queue full" in alerting.stderr()  # dropped (and counted), not waited for
    assert LOCALHOST in hanging.url

    # shutting down flushes the queue only for a bounded time, even with Slack hanging
    assert alerting.process is not None
    started = time.monotonic()
    alerting.process.terminate()
    returncode = await asyncio.to_thread(alerting.process.wait, 20)
    elapsed = time.monotonic() - started
    print(f"shutdown with a hanging Slack: {elapsed:.2f} s, exit {returncode}")
    assert returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert elapsed < 10  # the 5 s flush bound, not Slack's 30 s timeout


async def test_sender_is_paced_to_max_per_second(slack_mock: respx.MockRouter, clock: Any) -> None:
    slack_mock.post(SLACK).mock(return_value=httpx.Response(200, text="ok"))
    alerter = make(max_per_second=2.0)
    await alerter.start()
    for i in range(3):
        alerter.notify(Alert("trimmed", "http://o", f"/r{i}", 10, 20))
    await alerter.close()
    assert alerter.stats.sent == 3
    assert len(clock.sleeps) == 2 and all(0 < d <= 0.5 for d in clock.sleeps)  # at most 2 posts a second
