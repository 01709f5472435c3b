"""What each client key sees of a snapshot: its flags, computed once per snapshot and glob set."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.control.clients.keys import ClientKey
from proxy.control.clients.values import Encoded
from proxy.engine import Flag
from proxy.store.base import Snapshot


@dataclass(frozen=True, slots=True)
class View:
    flags: tuple[Flag, ...]  # sorted by key (the snapshot's order)
    by_key: dict[str, Flag]
    encoded: Encoded = field(default_factory=Encoded)  # this snapshot's answers, encoded once


class Views:
    """The current snapshot's ``View`` per glob set; rebuilt lazily when the snapshot changes."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._views: dict[tuple[str, ...], View] = {}

    def of(self, snapshot: Snapshot, key: ClientKey) -> View:
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._views = {}
        view = self._views.get(key.globs)
        if view is None:
            view = self._views[key.globs] = visible(snapshot, key)
        return view


def visible(snapshot: Snapshot, key: ClientKey) -> View:
    if key.globs == ("*",):
        flags = snapshot.ordered
    else:
        flags = tuple(flag for flag in snapshot.ordered if key.may_see(flag.key))
    return View(flags, {flag.key: flag for flag in flags})
