"""What the chat endpoints keep between requests: the Slack signatures and Telegram update ids seen
(bounded, per process), and the ``Outbox`` that posts replies and announcements in the background.

Nothing here is on a request's path: a post is a task of its own; when ``[chat] max_pending`` posts
are waiting, more are dropped and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import httpx

from proxy.alerts import MAX_ATTEMPTS, mrkdwn_escape, post_json
from proxy.config import ChatSettings

log = logging.getLogger("flagproxy.chat")

REPLAY_WINDOW_S = 300  # Slack's: a request's timestamp may be this far from now, either side
MAX_SIGNATURES = 100_000


class SeenSignatures:
    """Slack request signatures accepted within the replay window: a second one is a replay."""

    # a timestamp up to 300 s ahead is accepted and stays acceptable for 300 s after it: 600 s in all
    def __init__(self, window_s: float = 2 * REPLAY_WINDOW_S, limit: int = MAX_SIGNATURES) -> None:
        self.window_s, self.limit = window_s, limit
        self._until: OrderedDict[str, float] = OrderedDict()  # signature → when it may be forgotten

    def first_time(self, signature: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._until and (next(iter(self._until.values())) <= now or len(self._until) >= self.limit):
            self._until.popitem(last=False)
        if signature in self._until:
            return False
        self._until[signature] = now + self.window_s
        return True


class SeenUpdates:
    """Telegram ``update_id``s already recorded (the last ``limit``): a retried update applies once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ids: OrderedDict[int, None] = OrderedDict()

    def first_time(self, update_id: int) -> bool:
        if update_id in self._ids:
            return False
        self._ids[update_id] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)
        return True

    def forget(self, update_id: int) -> None:
        """The update was not taken after all (no room to run it): its retry must run."""
        self._ids.pop(update_id, None)


class Outbox:
    """Background work of the chat endpoints: JSON posts (a few attempts, ``429 Retry-After`` honoured)
    and deferred command runs. ``what`` names a post in the log; URLs are never logged (a Bot API URL
    holds the bot token)."""

    def __init__(self, timeout_s: float, max_pending: int) -> None:
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dropped = 0

    def spawn(self, work: Coroutine[Any, Any, Any], what: str) -> bool:
        if len(self._tasks) >= self.max_pending:
            work.close()
            self.dropped += 1
            log.warning(
                "chat: %d posts pending; dropped %s (%d so far)", len(self._tasks), what, self.dropped
            )
            return False
        self.keep(asyncio.create_task(self._guarded(work, what), name=f"flagproxy-chat {what}"))
        return True

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a task started elsewhere until it ends (the loop keeps only weak references), so a
        command whose request went away still finishes, and shutdown waits for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def post(self, url: str, payload: dict[str, Any], what: str) -> bool:
        return self.spawn(self.send(url, payload, what), what)

    async def send(self, url: str, payload: dict[str, Any], what: str) -> bool:
        """POST ``payload`` as JSON; True when the receiver answered 2xx."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        outcome = await post_json(self._client, url, payload)
        if isinstance(outcome, httpx.HTTPError):
            log.error("chat: %s failed after %d attempts: %s", what, MAX_ATTEMPTS, type(outcome).__name__)
            return False
        if not outcome.is_success:
            log.error("chat: %s answered %d %.200s", what, outcome.status_code, outcome.text)
        return outcome.is_success

    async def _guarded(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await work
        except Exception:  # one failed post never stops the others
            log.exception("chat: %s failed", what)

    async def close(self, flush_timeout_s: float = 5.0) -> None:
        """Let pending posts finish (bounded), then stop."""
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=flush_timeout_s)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def telegram_chat(chat_id: str) -> int | str:
    """A Telegram ``chat_id`` setting as the Bot API takes it: a number, or ``@channelusername``."""
    return int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id


class ChatRuntime:
    def __init__(self, settings: ChatSettings, change_channel: str = "") -> None:
        self.settings = settings
        # [alerts] change_channel: every change is posted there already, chat changes included, so an
        # announcement to the same destination would be a second line for one change
        self.change_channel = change_channel
        self.outbox = Outbox(settings.timeout_s, settings.max_pending)
        self.slack_seen = SeenSignatures()
        self.telegram_seen = SeenUpdates(settings.telegram.dedupe_size)

    def telegram_url(self, method: str) -> str:
        tg = self.settings.telegram
        return f"{tg.api_url.rstrip('/')}/bot{tg.bot_token}/{method}"

    def announce(self, text: str, skip_telegram_chat: int | None = None) -> None:
        """A change, told in every configured channel (Slack incoming webhook, Telegram chat); not in
        the Telegram chat the command came from (everyone there sees the reply)."""
        slack, telegram = self.settings.slack, self.settings.telegram
        if slack.announce_webhook_url and slack.announce_webhook_url != self.change_channel:
            self.outbox.post(slack.announce_webhook_url, {"text": mrkdwn_escape(text)}, "Slack announcement")
        chat_id = telegram.announce_chat_id  # a numeric id, or "@channelusername"
        chat = telegram_chat(chat_id)
        noticed = self.change_channel == f"telegram:{chat_id}"
        if chat_id and telegram.bot_token and chat != skip_telegram_chat and not noticed:
            payload = {"chat_id": chat, "text": text}
            self.outbox.post(self.telegram_url("sendMessage"), payload, "Telegram announcement")

    def telegram_notifier(self, chat_id: str) -> TelegramNotifier:
        """For lifecycle notices on ``telegram:<chat id>`` channels (change notices, the digest)."""
        return TelegramNotifier(self, chat_id)

    async def close(self) -> None:
        await self.outbox.close()


CODE_SPAN = re.compile(r"`([^`\n]*)`")
BOLD_LINE = re.compile(r"^\*([^*\n]+)\*$", re.MULTILINE)


def mrkdwn_as_html(text: str) -> str:
    """A notice written in Slack mrkdwn as Telegram HTML. Slack's escaping (``&amp;``, ``&lt;``,
    ``&gt;``) is HTML's, so the text stays escaped; `code` spans and whole *bold* lines become tags."""
    return BOLD_LINE.sub(r"<b>\1</b>", CODE_SPAN.sub(r"<code>\1</code>", text))


class TelegramNotifier:
    """A change notice or digest, sent to one Telegram chat through the bot (needs ``bot_token``)."""

    def __init__(self, runtime: ChatRuntime, chat_id: str) -> None:
        self.runtime = runtime
        self.chat = telegram_chat(chat_id)

    def post(self, condition: str, text: str) -> bool:
        if not self.runtime.settings.telegram.bot_token:
            log.warning("chat: a %s notice for Telegram, but [chat.telegram] bot_token is not set", condition)
            return False
        payload = {"chat_id": self.chat, "text": mrkdwn_as_html(text), "parse_mode": "HTML"}
        return self.runtime.outbox.post(
            self.runtime.telegram_url("sendMessage"), payload, f"Telegram {condition}"
        )
