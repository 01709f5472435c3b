"""The one small interface exposures and conversions are written through (SQLite, Redis; a
warehouse or Kafka sink can follow).

A backend is used from one writer thread per process and must give the same answers whatever the
number of processes or instances writing to it: first write wins, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from proxy.config import Settings
from proxy.experiments.records import Applied, ConversionRecord, Counts, ExposureRecord


class BackendError(Exception):
    """The backend could not apply or read (it is down, locked, full); the batch may be retried."""


class Backend(Protocol):
    name: str  # "sqlite", "redis": the label of its metrics

    def apply(self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]) -> Applied:
        """Apply one batch atomically per experiment: exposures first, then conversions, each in order.

        Blocking; raises ``BackendError`` when nothing (or not all) could be written. Applying the
        same batch twice counts nothing twice (first write wins), so a failed batch can be retried.
        """
        ...

    def counts(self, flag: str) -> Counts | None:
        """What is recorded for ``flag``; None when nothing is."""
        ...

    def flags(self) -> list[str]:
        """The experiment flags with recorded data, sorted."""
        ...

    def reset(self, flag: str) -> bool:
        """Forget everything recorded for ``flag``; False when there was nothing."""
        ...

    def close(self) -> None: ...


def open_backend(settings: Settings) -> Backend:
    """``[experiments] backend``: Redis when ``auto`` and ``[store] redis_url`` is set, else SQLite."""
    kind = settings.experiments.backend
    if kind == "redis" or (kind == "auto" and settings.store.uses_redis):
        from proxy.experiments.redis_backend import RedisBackend  # the client only when it is used

        return RedisBackend(settings=settings.store)
    from proxy.experiments.sqlite import SQLiteBackend

    return SQLiteBackend(settings.experiments.path)
