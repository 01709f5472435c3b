"""Where change notices and the stale digest go: a tiny ``Notifier`` per channel.

A channel is a string from the settings (``[alerts] change_channel``, ``[lifecycle] digest_channel``):

- ``https://hooks.slack.com/…`` (any http(s) URL): a Slack incoming webhook, posted by the alerts
  sender (queued, paced, retried; never on the request path);
- ``telegram:<chat id>``: whatever notifier is registered for ``telegram`` (the chat integration
  registers one with ``Notifiers.register``); none registered → the notice is only logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from proxy.alerts import Alerter, Notice

log = logging.getLogger("flagproxy.lifecycle")


class Notifier(Protocol):
    def post(self, condition: str, text: str) -> bool:
        """Queue one message (``condition``: "change" or "digest"); cheap, never blocks; False when
        it will not be sent. ``text`` is Slack mrkdwn, already escaped."""
        ...


class SlackNotifier:
    def __init__(self, alerter: Alerter, url: str) -> None:
        self.alerter = alerter
        self.url = url

    def post(self, condition: str, text: str) -> bool:
        return self.alerter.post(Notice(condition, text, self.url))


class Notifiers:
    """Channel string → notifier; schemes other than http(s) come from registered factories."""

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter
        self._factories: dict[str, Callable[[str], Notifier]] = {}
        self._warned: set[str] = set()

    def register(self, scheme: str, factory: Callable[[str], Notifier]) -> None:
        """``factory(rest)`` builds the notifier for channels ``scheme:rest`` (``telegram:<chat id>``)."""
        self._factories[scheme] = factory

    def for_channel(self, channel: str) -> Notifier | None:
        if not channel:
            return None
        if channel.startswith(("http://", "https://")):
            return SlackNotifier(self.alerter, channel)
        scheme, _, rest = channel.partition(":")
        factory = self._factories.get(scheme)
        if factory is None:
            if channel not in self._warned:
                self._warned.add(channel)
                log.warning("no notifier for channel %r: notices are logged only", channel)
            return None
        return factory(rest)
