"""The embedded experiment backend: one SQLite file (WAL), shared by every worker process of a host.

Layout (docs/experiments.md, "Storage"):

- ``meta(key, value)``                              ``schema_version``
- ``experiments(id, flag, started_at, unattributed)`` one row per experiment flag with data
- ``exposures(experiment, unit, variant, at)``       a unit's first exposure; PK (experiment, unit)
- ``multiple(experiment, unit)``                     units exposed to more than one variant
- ``conversions(experiment, goal, unit, variant, at, value)``  counted ones; PK (experiment, goal, unit)

First write wins exactly, whatever the number of processes: every batch is one ``BEGIN IMMEDIATE``
transaction (one writer at a time, the others wait up to ``busy_timeout_s``), and the rows that
decide are inserted with ``ON CONFLICT DO NOTHING`` on their primary keys. A batch is all or
nothing: a failure rolls it back and raises ``BackendError``, so the caller can retry it.

The write connection is used by one writer thread; ``counts``/``flags`` may be called from any
thread and read on a connection of their own (WAL readers do not wait for the writer). Both
connections are opened on first use, so a file that cannot be opened is reported by ``apply``
(or ``counts``), not by the constructor.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from proxy.experiments.backend import BackendError
from proxy.experiments.records import (
    BEFORE_EXPOSURE,
    COUNTED,
    DUPLICATE,
    EXPOSED,
    MULTIPLE,
    NOT_EXPOSED_YET,
    OUTSIDE_WINDOW,
    REPEAT,
    UNATTRIBUTED,
    Applied,
    ConversionRecord,
    Counts,
    ExposureRecord,
)

SCHEMA_VERSION = 1

META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    flag TEXT NOT NULL UNIQUE,
    started_at REAL,
    unattributed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS exposures (
    experiment INTEGER NOT NULL,
    unit TEXT NOT NULL,
    variant TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (experiment, unit)
) WITHOUT ROWID;
-- counts() groups by variant: on this index it reads ~10 ms for 100k units, not ~30 ms
CREATE INDEX IF NOT EXISTS exposures_by_variant ON exposures (experiment, variant);
CREATE TABLE IF NOT EXISTS multiple (
    experiment INTEGER NOT NULL,
    unit TEXT NOT NULL,
    PRIMARY KEY (experiment, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversions (
    experiment INTEGER NOT NULL,
    goal TEXT NOT NULL,
    unit TEXT NOT NULL,
    variant TEXT NOT NULL,
    at REAL NOT NULL,
    value REAL,
    PRIMARY KEY (experiment, goal, unit)
) WITHOUT ROWID;
"""

INSERT_EXPOSURE = (
    "INSERT INTO exposures (experiment, unit, variant, at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
FIRST_EXPOSURE = "SELECT variant, at FROM exposures WHERE experiment = ? AND unit = ?"
# A batch's rows travel as one JSON array: one statement step for the whole batch. (pysqlite lets go
# of the interpreter lock around every step, and the event loop's thread then competes for it back:
# per-row statements cost requests two thread switches a row.) JSON1 is built into SQLite >= 3.38.
FIRST_VARIANTS = (
    "SELECT unit, variant FROM exposures WHERE experiment = ? AND unit IN (SELECT value FROM json_each(?))"
)
# times travel as integer microseconds: a float's shortest repr costs more than the rest of its row
INSERT_EXPOSURES = (
    "INSERT INTO exposures (experiment, unit, variant, at)"
    " SELECT ?1, value ->> 0, value ->> 1, (value ->> 2) / 1000000.0 FROM json_each(?2) WHERE true"
    " ON CONFLICT DO NOTHING"
)
MULTIPLE_ONE = "INSERT INTO multiple (experiment, unit) VALUES (?, ?) ON CONFLICT DO NOTHING"
INSERT_MULTIPLE = (
    "INSERT INTO multiple (experiment, unit) SELECT ?1, value FROM json_each(?2) WHERE true"
    " ON CONFLICT DO NOTHING"
)
INSERT_CONVERSION = (
    "INSERT INTO conversions (experiment, goal, unit, variant, at, value) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
EARLIER_START = (
    "UPDATE experiments SET started_at = ? WHERE id = ? AND (started_at IS NULL OR started_at > ?)"
)


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, path: str, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    # --- the protocol ------------------------------------------------------------------------------

    def apply(self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]) -> Applied:
        applied = Applied()
        if not exposures and not conversions:
            return applied
        with self._writing("apply") as db:
            ids: dict[str, int] = {}
            applied.exposures = self._expose_all(db, ids, exposures)
            applied.conversions = [self._convert(db, ids, record) for record in conversions]
        return applied

    def counts(self, flag: str) -> Counts | None:
        with self._reading("counts") as db:
            row = db.execute(
                "SELECT id, started_at, unattributed FROM experiments WHERE flag = ?", (flag,)
            ).fetchone()
            if row is None:
                return None
            experiment, started_at, unattributed = row
            counts = Counts(started_at=started_at, unattributed=unattributed)
            counts.users = dict(
                db.execute(
                    "SELECT variant, COUNT(*) FROM exposures WHERE experiment = ? GROUP BY variant",
                    (experiment,),
                ).fetchall()
            )
            (counts.multiple_exposures,) = db.execute(
                "SELECT COUNT(*) FROM multiple WHERE experiment = ?", (experiment,)
            ).fetchone()
            for goal, variant, units, total in db.execute(
                "SELECT goal, variant, COUNT(*), SUM(value) FROM conversions WHERE experiment = ?"
                " GROUP BY goal, variant",
                (experiment,),
            ):
                counts.conversions.setdefault(goal, {})[variant] = units
                if total is not None:  # some counted conversion of this goal and variant had a value
                    counts.values.setdefault(goal, {})[variant] = total
            return counts

    def flags(self) -> list[str]:
        with self._reading("flags") as db:
            return [flag for (flag,) in db.execute("SELECT flag FROM experiments ORDER BY flag")]

    def reset(self, flag: str) -> bool:
        with self._writing("reset") as db:
            row = db.execute("SELECT id FROM experiments WHERE flag = ?", (flag,)).fetchone()
            if row is not None:
                for table in ("exposures", "multiple", "conversions"):
                    db.execute(f"DELETE FROM {table} WHERE experiment = ?", row)
                db.execute("DELETE FROM experiments WHERE id = ?", row)
        return row is not None

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # --- one record --------------------------------------------------------------------------------

    def _experiment(self, db: sqlite3.Connection, ids: dict[str, int], flag: str) -> int:
        """The flag's row id, created if absent (looked up once per transaction: a ``reset`` by
        another process between two batches deletes the row)."""
        found = ids.get(flag)
        if found is None:
            db.execute("INSERT INTO experiments (flag) VALUES (?) ON CONFLICT DO NOTHING", (flag,))
            (found,) = db.execute("SELECT id FROM experiments WHERE flag = ?", (flag,)).fetchone()
            ids[flag] = found
        return found

    def _expose_all(
        self, db: sqlite3.Connection, ids: dict[str, int], records: Sequence[ExposureRecord]
    ) -> list[str]:
        """A batch's exposures with a few statements per experiment, not per record (the writer
        thread shares the interpreter with the event loop): read the units' first variants, decide
        in order, insert what is new. Inside the batch's ``BEGIN IMMEDIATE`` no other process
        writes, so what was read is still true when the new rows go in."""
        outcomes = [""] * len(records)
        by_flag: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_flag.setdefault(record.flag, []).append(i)
        for flag, indexes in by_flag.items():
            experiment = self._experiment(db, ids, flag)
            units = list({records[i].unit: None for i in indexes})
            first = _first_variants(db, experiment, units)
            new: list[tuple[str, str, int]] = []  # (unit, variant, at in µs)
            multiple: dict[str, None] = {}
            for i in indexes:
                record = records[i]
                variant = first.get(record.unit)
                if variant is None:
                    first[record.unit] = record.variant
                    new.append((record.unit, record.variant, round(record.at * 1_000_000)))
                    outcomes[i] = EXPOSED
                elif variant == record.variant:
                    outcomes[i] = REPEAT
                else:
                    multiple[record.unit] = None
                    outcomes[i] = MULTIPLE
            rows = _json(new) if new else ""
            if new and _json_safe(rows):
                db.execute(INSERT_EXPOSURES, (experiment, rows))
            elif new:
                db.executemany(INSERT_EXPOSURE, [(experiment, u, v, at / 1e6) for u, v, at in new])
            if new:
                earliest = min(row[2] for row in new) / 1e6
                db.execute(EARLIER_START, (earliest, experiment, earliest))
            units_json = _json(list(multiple)) if multiple else ""
            if multiple and _json_safe(units_json):
                db.execute(INSERT_MULTIPLE, (experiment, units_json))
            elif multiple:
                db.executemany(MULTIPLE_ONE, [(experiment, unit) for unit in multiple])
        return outcomes

    def _convert(self, db: sqlite3.Connection, ids: dict[str, int], record: ConversionRecord) -> str:
        if not record.final and record.flag not in ids:  # no row for an experiment with no data
            row = db.execute("SELECT id FROM experiments WHERE flag = ?", (record.flag,)).fetchone()
            if row is None:
                return NOT_EXPOSED_YET
            ids[record.flag] = row[0]
        experiment = self._experiment(db, ids, record.flag)
        first = db.execute(FIRST_EXPOSURE, (experiment, record.unit)).fetchone()
        if first is None:
            if not record.final:
                return NOT_EXPOSED_YET
            db.execute("UPDATE experiments SET unattributed = unattributed + 1 WHERE id = ?", (experiment,))
            return UNATTRIBUTED
        variant, first_at = first
        at = float(record.at)
        if at < first_at:
            return BEFORE_EXPOSURE
        if at > first_at + record.window_s:
            return OUTSIDE_WINDOW
        value = record.value
        if value is not None and not math.isfinite(value):
            value = None  # a sum that became inf or nan would say nothing: the conversion counts, not it
        row = (experiment, record.goal, record.unit, variant, at, None if value is None else float(value))
        return COUNTED if db.execute(INSERT_CONVERSION, row).rowcount == 1 else DUPLICATE

    # --- connections -------------------------------------------------------------------------------

    def _open(self, writer: bool) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # timeout: SQLite's busy timeout; isolation_level None: transactions are begun here, explicitly
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            if writer:
                self._wal(db)
                db.execute("PRAGMA synchronous = NORMAL")
                self._create(db)
            else:
                db.execute("PRAGMA query_only = ON")
            return db
        except BaseException:
            db.close()
            raise

    def _wal(self, db: sqlite3.Connection) -> None:
        """WAL mode, kept in the file: set once, by the first process to open it. Switching needs the
        file to itself, and SQLite answers "locked" at once (without waiting the busy timeout) when
        other processes are opening the new file too: they take turns, up to the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone() != ("wal",):
                    db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _create(self, db: sqlite3.Connection) -> None:
        """The tables, if absent, in a file of this schema version (another is refused, not changed)."""
        with transaction(db):
            db.execute(META)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and row[0] != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {row[0]}, this flagproxy knows {SCHEMA_VERSION}")
            if row is None:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )

    @contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """The write connection inside one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back."""
        with self._write_lock, self._errors(what):
            if self._writer is None:
                self._writer = self._open(writer=True)
            db = self._writer
            try:
                with transaction(db):
                    yield db
            except BaseException:
                if db.in_transaction:  # not even rolled back: a new connection next time
                    self._writer = None
                    db.close()
                raise

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        """The read connection inside one read transaction (one consistent snapshot)."""
        with self._read_lock, self._errors(what):
            if self._reader is None:
                with self._write_lock:  # the schema exists before anything reads it
                    self._writer = self._writer or self._open(writer=True)
                self._reader = self._open(writer=False)
            db = self._reader
            try:
                db.execute("BEGIN")
                yield db
                db.execute("COMMIT")
            except BaseException:
                self._reader = None  # a new connection next time, never one left in a transaction
                db.close()
                raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"sqlite {self.path}: {what} failed: {exc}") from exc


def _json(rows: list[Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def _json_safe(encoded: str) -> bool:
    """SQLite's JSON functions end a text at an escaped NUL: such rows take the per-row statements.
    (A text holding the six characters ``\\u0000`` is sent that way too: slower, still right.)"""
    return "\\u0000" not in encoded


def _first_variants(db: sqlite3.Connection, experiment: int, units: list[str]) -> dict[str, str]:
    """unit → its first variant, for the ``units`` already exposed in ``experiment``."""
    encoded = _json(units)
    if _json_safe(encoded):
        return dict(db.execute(FIRST_VARIANTS, (experiment, encoded)).fetchall())
    first: dict[str, str] = {}
    for unit in units:
        row = db.execute(FIRST_EXPOSURE, (experiment, unit)).fetchone()
        if row is not None:
            first[unit] = row[0]
    return first


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
