"""SIGHUP: the settings file and the flags file read again, applied without dropping a connection.

What changes live: ``[[origins]]``, ``[[routes]]``, ``[upstream]`` and per-origin timeouts,
``[proxy]``, the ``[server]`` timeouts and limits (new connections), ``[[goals]]``,
``[[client_keys]]`` and ``[client_api]``, ``[alerts]``, ``[admin]``, ``[metrics]``, ``[webhooks]``
and the log level; and the flags file (re-read and applied like an edit). In-flight requests finish
with what they started with. Anything else that changed is named in one log line as needing a
restart, and keeps its old value until then. New settings that do not validate change nothing.

With ``--workers N`` the supervisor handles SIGHUP instead: it checks the new settings, then
replaces the workers one by one, each new one ready before the old one stops
(``proxy.server.ReloadingSupervisor``); every setting but the listener's applies then. It refuses
on the memory store, where each worker's flags are its own and would be lost with it.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Settings

if TYPE_CHECKING:
    from proxy.app import FlagProxy

log = logging.getLogger("flagproxy")
early_sighup = threading.Event()  # a SIGHUP that came before the proxy could reload: done once ready


def hold_early_sighup() -> None:
    """From the start of ``serve`` until the app takes over: a SIGHUP is noted, not fatal."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: early_sighup.set())


# [server] settings a running listener cannot take: the rest are read per new connection
SERVER_FIXED = ("host", "port", "control_port", "control_prefix", "shutdown_grace_s")
LIVE_SECTIONS = frozenset(
    {"origins", "routes", "upstream", "proxy", "goals", "client_keys", "client_api", "alerts", "admin"}
    | {"metrics", "webhooks", "console"}
)
LOG_LIVE = ("level",)


@dataclass
class ReloadReport:
    applied: list[str] = field(default_factory=list)  # what changed and took effect
    restart: list[str] = field(default_factory=list)  # what changed but needs a restart

    def summary(self) -> str:
        applied = ", ".join(self.applied) or "nothing"
        text = f"settings reloaded: {applied} changed"
        if self.restart:
            text += f"; needs a restart to take effect (kept as before): {', '.join(self.restart)}"
        return text


def _fields(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _restart_only(section: str, key: str) -> bool:
    """Of [server], [log] and [store]: does ``key`` keep its running value until a restart?"""
    if section == "server":
        return key in SERVER_FIXED
    if section == "log":
        return key not in LOG_LIVE
    return True  # [store]: the store and its file are built once


def compare(old: Settings, new: Settings) -> ReloadReport:
    """What differs between ``old`` and ``new``, split into live and restart-only names."""
    report = ReloadReport()
    for f in dataclasses.fields(Settings):
        name = f.name
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name == "sources":  # the sources' own sections, [split] and the like
            for section in sorted(set(before) | set(after)):
                if before.get(section) != after.get(section):
                    report.restart.append(f"[{section}]")
            continue
        title = f"[[{name}]]" if name in ("origins", "routes", "goals", "client_keys") else f"[{name}]"
        if name in LIVE_SECTIONS:
            report.applied.append(title)
            continue
        if name in ("server", "log", "store"):  # named key by key: some of them change live
            b, a = _fields(before), _fields(after)
            for key in (k for k in b if b[k] != a[k]):
                (report.restart if _restart_only(name, key) else report.applied).append(f"[{name}] {key}")
            continue
        report.restart.append(title)
    return report


LISTENER = ("host", "port", "control_port", "shutdown_grace_s")  # what a supervisor's sockets fix


def compare_workers(old: Settings, new: Settings) -> ReloadReport:
    """``--workers``: new workers read everything afresh, except what the supervisor holds."""
    report = compare(old, new)
    changed = report.applied + report.restart
    fixed = {f"[server] {key}" for key in LISTENER}
    return ReloadReport([n for n in changed if n not in fixed], [n for n in changed if n in fixed])


def effective(old: Settings, new: Settings) -> Settings:
    """``new`` with every restart-only setting kept at its running value."""
    server = dataclasses.replace(new.server, **{k: getattr(old.server, k) for k in SERVER_FIXED})
    log_ = dataclasses.replace(old.log, **{k: getattr(new.log, k) for k in LOG_LIVE})
    kept: dict[str, Any] = {
        f.name: getattr(old, f.name)
        for f in dataclasses.fields(Settings)
        if f.name not in LIVE_SECTIONS and f.name not in ("server", "log")
    }
    return dataclasses.replace(new, **kept, server=server, log=log_)


async def reload(app: FlagProxy, new: Settings) -> ReloadReport:
    """Apply ``new`` (already validated) to the running ``app``; the flags file is re-read too."""
    report = compare(app.settings, new)
    settings = effective(app.settings, new)
    if report.applied:
        await app.reconfigure(settings)
    native = app.syncs.get("native")
    if native is not None:
        native.trigger()
    log.info("%s", report.summary())
    return report
