"""Redis store: flags shared by every proxy instance, changes fanned out by pub/sub.

Layout (``P`` = ``{redis_prefix}:{environment}``, see docs/store.md):

- ``P:{source}:{kind}``           hash  item key → definition JSON (``native:flags``, ``split:segments``…)
- ``P:{source}:{kind}:versions``  hash  item key → the source's own version of it (updatedAt ms, changeNumber)
- ``P:{source}:meta``             hash  ``{kind}:version`` → the source version last applied
- ``P:version``                   int   store version, +1 for every applied change
- ``P:generation``                hash  ``id`` of this seeding of Redis; ``base_id``/``base_version``: the
                                        content it was seeded from (``proxy.store.lineage``)
- ``P:inited``                    str   init marker: missing means Redis lost its data
- ``P:audit``                     list  newest first, capped
- ``P:delivery:{source}:{id}``    str   a webhook delivery id seen, expiring with its signature window
- ``P:changes``                   channel  ``{"version", "generation", "source", "kind", "keys"}`` per change
- ``P:lifecycle:first_seen``      hash  flag key → when it first appeared (epoch s; ``HSETNX``: first wins)
- ``P:lifecycle:usage``           hash  flag key → usage JSON (``proxy.store.ledger``)
- ``P:lifecycle:digest:{day}``    hash  flags the day's stale digest named (expires after 3 days)

Every write is one Lua script (atomic, ordered by the source's versions). Each instance keeps a
compiled snapshot, applies announced changes incrementally, resyncs fully on a gap and every
``resync_interval_s``, and keeps serving its state (and a copy on disk) while Redis is away.

After data loss, **the highest version wins** and versions never name two contents:

- A version names content only within its generation; every (re-)seed starts a new one. An
  announced change is applied on top of this instance's state only when it is of the same
  generation and the next version; anything else is a full read.
- The re-seed script writes an instance's state into Redis only if Redis is uninitialised or holds
  an older version — checked and written in one script, so of several instances reconnecting to an
  emptied Redis the most up-to-date one's state ends up there, whoever comes first. An instance
  that finds Redis *older* than what it served (a staler instance re-seeded first) says so at ERROR,
  counts ``flagproxy_store_rollbacks_total{outcome="restored"}`` and writes its state back.
- Every write carries the version and generation this instance serves; the apply script refuses
  (``behind``) to write on top of an older or other state, so the instance first brings Redis up to
  date as above, and a write never reuses a version number this instance served.
- An instance adopting a state that does not hold what it served (a staler instance re-seeded and
  took writes while this one was away: two histories, the higher version wins) says so at ERROR and
  counts ``{outcome="adopted"}``. Nothing steps back silently.

Redis answering garbage (a non-integer version, a wrong key type) is ``StoreUnreadable``: the
instance keeps serving what it has (at start: the disk snapshot or the flags file, and it is ready),
logs ERROR, and keeps retrying; the scripts refuse to write on such values. A write whose answer
does not come back in time may still be applied: ``StoreTimeout`` (``504 store_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import BusyLoadingError, NoScriptError, RedisError, ResponseError

from proxy.config import StoreSettings
from proxy.metrics import Metrics
from proxy.store import connect
from proxy.store.base import SnapshotHolder, StoreTimeout, StoreUnavailable
from proxy.store.change import Change, now_iso
from proxy.store.lineage import holds, origin, restore_version
from proxy.store.outage import Outage
from proxy.store.redis_ledger import RedisLedger
from proxy.store.state import ApplyResult, Compiler, Generation, RawState, layout

log = logging.getLogger("flagproxy.store")

APPLY_LUA = """
local data, vers, meta, verkey, audit, inited = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local genkey = KEYS[7]
local delivery = KEYS[8]  -- only when the change carries a delivery id
local p = cjson.decode(ARGV[1])
local channel, publish = ARGV[2], ARGV[3]  -- PUBLISH, or SPUBLISH on a Cluster
if redis.call('EXISTS', inited) == 0 then
  -- Redis lost its data (or was never seeded): writing now would make this change all there is.
  return cjson.encode({status = 'uninitialized'})
end
if delivery and redis.call('EXISTS', delivery) == 1 then
  return cjson.encode({status = 'duplicate', version = tonumber(redis.call('GET', verkey) or '0')})
end
-- Before writing anything: values this script compares must be integers (a script failing half-way
-- would leave half a change), and Redis must hold the state the writer serves or a later one.
-- (18 digits at most: INCR refuses what does not fit 64 bits, and by then the change is half written)
local function integer(value)
  return (not value) or (string.match(value, '^%-?%d+$') ~= nil and #value <= 18)
end
local function corrupt(what)
  return cjson.encode({status = 'corrupt', detail = what .. ' is not an integer'})
end
-- and every key the script writes must be of its kind (a WRONGTYPE half-way is a half-written change)
local kinds = {{data, 'hash'}, {vers, 'hash'}, {meta, 'hash'}, {genkey, 'hash'}, {verkey, 'string'},
  {audit, 'list'}, {inited, 'string'}}
for _, pair in ipairs(kinds) do
  local found = redis.call('TYPE', pair[1]).ok
  if found ~= 'none' and found ~= pair[2] then
    return cjson.encode({status = 'corrupt', detail = pair[1] .. ' is a ' .. found .. ', not a ' .. pair[2]})
  end
end
local stored = redis.call('GET', verkey)
if not integer(stored) then return corrupt(verkey) end
if not integer(redis.call('HGET', meta, p.kind .. ':version')) then return corrupt(meta) end
for _, list in ipairs({p.upsert, p.delete}) do
  for _, item in ipairs(list) do
    if not integer(redis.call('HGET', vers, item[1])) then return corrupt(vers .. ' ' .. item[1]) end
  end
end
local floor = tonumber(p.floor or -1)
local generation = redis.call('HGET', genkey, 'id') or ''
if floor >= 0 and (tonumber(stored or '0') < floor or generation ~= p.generation) then
  return cjson.encode({status = 'behind', version = tonumber(stored or '0')})
end
local sv = tonumber(p.source_version)
local svfield = p.kind .. ':version'
local cur = tonumber(redis.call('HGET', meta, svfield) or '-1')
if sv >= 0 and sv <= cur then
  return cjson.encode({status = 'stale', stored = cur, version = tonumber(redis.call('GET', verkey) or '0')})
end
if p.replace and sv < 0 and cur >= 0 then
  return cjson.encode({status = 'version_required', stored = cur,
    version = tonumber(redis.call('GET', verkey) or '0')})
end
local changed, actions, ignored, incoming = {}, {}, {}, {}
local stamp = tonumber(p.stamp)
-- state.item_version: does the change apply to the item, and the item's version after it (nil: none)
local function decide(key, ver)
  local stored = redis.call('HGET', vers, key)
  if stored then stored = tonumber(stored) end
  if ver >= 0 then return (not stored) or stored < ver, ver end
  if stamp < 0 then return true, nil end
  if p.supersede then
    if (not stored) or stored < stamp then return true, stamp end
    return true, stored
  end
  return (not stored) or stored <= stamp, stamp
end
for _, item in ipairs(p.upsert) do
  local key, text = item[1], item[2]
  incoming[key] = true
  local applies, ver = decide(key, tonumber(item[3]))
  if applies then
    if redis.call('HGET', data, key) ~= text then
      redis.call('HSET', data, key, text)
      table.insert(changed, key)
      table.insert(actions, 'upsert')
    end
    if ver then redis.call('HSET', vers, key, string.format('%d', ver)) end
  else
    table.insert(ignored, key)
  end
end
local deletes = p.delete
if p.replace then
  deletes = {}
  for _, key in ipairs(redis.call('HKEYS', data)) do
    if not incoming[key] then table.insert(deletes, {key, -1}) end
  end
end
for _, item in ipairs(deletes) do
  local key = item[1]
  local applies, ver = decide(key, tonumber(item[2]))
  if applies then
    if redis.call('HDEL', data, key) == 1 then
      table.insert(changed, key)
      table.insert(actions, 'delete')
    end
    if ver then
      redis.call('HSET', vers, key, string.format('%d', ver))  -- a tombstone: older upserts stay ignored
    else
      redis.call('HDEL', vers, key)
    end
  else
    table.insert(ignored, key)
  end
end
if sv >= 0 then redis.call('HSET', meta, svfield, string.format('%d', sv)) end
redis.call('SET', inited, '1')
if delivery and tonumber(p.delivery_ttl) > 0 then
  redis.call('SET', delivery, '1', 'EX', string.format('%d', p.delivery_ttl))
end
local old = tonumber(redis.call('GET', verkey) or '0')
if #changed == 0 then
  return cjson.encode({status = 'unchanged', version = old, ignored = ignored})
end
local version = redis.call('INCR', verkey)
for i, key in ipairs(changed) do
  redis.call('LPUSH', audit, cjson.encode({time = p.time, source = p.source, actor = p.actor, flag = key,
    action = (p.action ~= '' and p.action) or actions[i], old_version = old, new_version = version}))
end
redis.call('LTRIM', audit, 0, tonumber(p.audit_max) - 1)
local announcement = {version = version, generation = generation, source = p.source, kind = p.kind,
  keys = changed}
redis.call(publish, channel, cjson.encode(announcement))
return cjson.encode({status = 'applied', version = version, changed = changed, ignored = ignored})
"""

RESEED_LUA = """
-- Write a state into Redis if Redis has none or an older one: the highest version wins.
-- KEYS[1] the version key (it routes the script to the node of every key's slot on a Cluster)
local p = cjson.decode(ARGV[1])
local cur = redis.call('GET', p.version_key)
if redis.call('EXISTS', p.inited) == 1 then
  if cur and not string.match(cur, '^%d+$') then return cjson.encode({status = 'corrupt'}) end
  cur = tonumber(cur or '0')
  if cur >= tonumber(p.version) then return cjson.encode({status = 'kept', version = cur}) end
end
for _, name in ipairs(p.clear) do redis.call('DEL', name) end
for name, fields in pairs(p.hashes) do
  for field, value in pairs(fields) do redis.call('HSET', name, field, value) end
end
local version = string.format('%d', p.version)
redis.call('SET', p.version_key, version)
redis.call('DEL', p.generation_key)
redis.call('HSET', p.generation_key, 'id', p.generation.id, 'base_id', p.generation.base_id,
  'base_version', string.format('%d', p.generation.base_version))
redis.call('SET', p.inited, '1')
local announcement = {version = p.version, generation = p.generation.id, reseed = true}
redis.call(p.publish, p.channel, cjson.encode(announcement))
return cjson.encode({status = 'seeded', version = p.version})
"""

INTEGER = re.compile(r"-?[0-9]+")


class StoreUnreadable(Exception):
    """Redis answered, but with data this instance cannot use (not an integer, a wrong key type)."""


# Redis away, refusing or mid-failover (and the store saying so); and with data this instance cannot use
AWAY: tuple[type[Exception], ...] = (*connect.FAILURES, StoreUnavailable)
UNUSABLE: tuple[type[Exception], ...] = (*AWAY, StoreUnreadable)


def _integer(where: str, value: Any) -> int:
    if isinstance(value, str) and INTEGER.fullmatch(value):
        return int(value)
    raise StoreUnreadable(f"{where} holds {value!r}, not an integer")


async def _run_script(
    connection: AbstractConnection, command: str, body: str, keys: list[str], args: list[str]
) -> str:
    await connection.send_command(command, body, len(keys), *keys, *args)
    reply = await connection.read_response()
    if not isinstance(reply, str):
        raise ResponseError(f"unexpected reply {reply!r}")
    return reply


# Error prefixes Redis answers before it runs a command: nothing of the write was applied.
REFUSED_BEFORE_RUNNING = frozenset(
    {"OOM", "READONLY", "NOPERM", "NOAUTH", "WRONGPASS", "MASTERDOWN", "MISCONF", "NOREPLICAS", "BUSY"}
    | {"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT"}  # a Cluster's: the node did not run it
)


def _error_code(exc: ResponseError) -> str:
    """The error's first word (``READONLY``, ``MOVED``): redis-py strips it from the message of the
    errors it has a class for and keeps it as ``status_code``."""
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, str) and code else str(exc).split(" ", 1)[0]


async def _alive(connection: AbstractConnection) -> None:
    """PING on the connection a write will use, reconnecting once: a pooled connection to a Redis
    that went away (and came back) fails here, before the write is sent, not after (which would be
    "outcome unknown")."""
    for attempt in range(2):
        try:
            await connection.send_command("PING")
            if await connection.read_response() in ("PONG", b"PONG", True):
                return
            raise ResponseError("unexpected reply to PING")
        except (RedisError, OSError) as exc:
            await connection.disconnect()
            if attempt or isinstance(exc, ResponseError):
                raise


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # cjson encodes an empty array as {}


class RedisKeys:
    def __init__(self, base: str) -> None:
        """``base``: ``prefix:environment``, or ``{prefix:environment}`` on a Cluster
        (``proxy.store.connect.key_base``): every key below shares its slot."""
        self.base = base
        self.version = f"{self.base}:version"
        self.generation = f"{self.base}:generation"
        self.inited = f"{self.base}:inited"
        self.audit = f"{self.base}:audit"
        self.channel = f"{self.base}:changes"

    def data(self, source: str, kind: str) -> str:
        return f"{self.base}:{source}:{kind}"

    def versions(self, source: str, kind: str) -> str:
        return f"{self.base}:{source}:{kind}:versions"

    def meta(self, source: str) -> str:
        return f"{self.base}:{source}:meta"

    def delivery(self, source: str, delivery: str) -> str:
        return f"{self.base}:delivery:{source}:{delivery}"


def save_snapshot_file(path: str, state: RawState) -> None:
    """Write atomically (temp file + rename): a crash never leaves a half-written snapshot."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".flagproxy-snapshot-", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state.to_json(), fh, separators=(",", ":"))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_snapshot_file(path: str) -> RawState | None:
    if not path or not Path(path).exists():
        return None
    try:
        return RawState.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.error("snapshot file %s is unreadable (%s); not using it", path, exc)
        return None


class RedisStore(SnapshotHolder):
    def __init__(
        self,
        settings: StoreSettings,
        fallback: Callable[[], RawState],
        metrics: Metrics | None = None,
        compiler: Compiler | None = None,
    ) -> None:
        super().__init__(compiler)
        self.layout = layout(self.compiler)
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.keys = RedisKeys(connect.key_base(settings))
        self.publish = connect.publish_command(settings)
        self.where = connect.where(settings)
        self.redis = connect.async_client(settings)
        self._apply_script = self.redis.register_script(APPLY_LUA)
        self._reseed_script = self.redis.register_script(RESEED_LUA)
        self.ledger = RedisLedger(self.redis, self.keys.base, usable=lambda: self.connected)
        self._fallback = fallback
        self._ready = False
        self._redis_version: int | None = None  # version of the last state read from Redis
        self._last_good: RawState | None = None  # last complete state from Redis or the disk snapshot
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._save_lock = threading.Lock()
        self._saved_version = -1
        self._unreadable = ""  # the problem last logged while Redis answers garbage
        self._outage = Outage(self.where, self.settings.reconnect_max_s)
        self.connected = False

    @property
    def ready(self) -> bool:
        return self._ready

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        disk = load_snapshot_file(self.settings.snapshot_path)
        if disk is not None:
            log.info(
                "serving the disk snapshot %s (version %d) until Redis answers",
                self.settings.snapshot_path,
                disk.version,
            )
            self._last_good = disk
            await self.install(disk)
        else:
            await self.install(self._fallback())
        self.metrics.synced("file")
        self.metrics.redis_connected.set(0)
        self._task = asyncio.create_task(self._run(), name="flagproxy-redis-sync")

    async def close(self) -> None:
        task = self._task
        if task is not None:
            # Cancelled again until it ends: redis-py can swallow a cancellation that lands while a
            # read times out (the subscription's wait), and the sync would carry on, holding the
            # shutdown for ever (seen when a start fails right after connecting).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_now()
        await connect.aclose(self.redis)
        self.stop_compiling()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._sync_forever()
            except asyncio.CancelledError:
                raise
            except StoreUnreadable as exc:
                self.connected = False
                self.metrics.redis_connected.set(0)
                self._cannot_read(str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            except AWAY as exc:
                if self.connected:
                    self.metrics.redis_reconnects.inc()
                self.connected = False
                self.metrics.redis_connected.set(0)
                await connect.refresh(self.redis)
                source = "disk snapshot" if self._last_good is not None else "flags file"
                self._outage.failed(str(exc), self.snapshot.version, source, at_start=not self._ready)
                self._ready = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            except Exception:
                log.exception("unexpected error in the Redis sync loop; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            else:
                delay = 0.05

    def _cannot_read(self, problem: str) -> None:
        """Redis answers garbage: serve what this instance has (ready from here on), say it once."""
        if not self._ready:
            source = "disk snapshot" if self._last_good is not None else "flags file"
            log.error(
                "Redis holds data this instance cannot use (%s): serving the %s meanwhile; retrying",
                problem,
                source,
            )
            self._ready = True
        elif problem != self._unreadable:
            log.error(
                "Redis holds data this instance cannot use (%s): still serving version %d; retrying",
                problem,
                self.snapshot.version,
            )
        self._unreadable = problem

    async def _sync_forever(self) -> None:
        subscription = await connect.subscribe(self.redis, self.keys.channel)
        try:  # subscribed first, so nothing published during the resync is missed
            await self.resync()
            self._outage.recovered(self.snapshot.version)
            self.connected = True
            self.metrics.redis_connected.set(1)
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + self.settings.resync_interval_s
            while True:
                wait = max(0.0, min(1.0, next_resync - loop.time()))
                data = await subscription.get(timeout=wait)
                if data is not None:
                    await self._on_message(data)
                if loop.time() >= next_resync:
                    await self.resync()
                    next_resync = loop.time() + self.settings.resync_interval_s
        finally:
            await subscription.aclose()

    # --- reading ----------------------------------------------------------------------------------

    async def _read_state(self) -> tuple[RawState, bool]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.version)
        pipe.exists(self.keys.inited)
        pipe.hgetall(self.keys.generation)
        pairs = [(source, kind) for source, kinds in self.layout.items() for kind in kinds]
        for source, kind in pairs:
            pipe.hgetall(self.keys.data(source, kind))
            pipe.hgetall(self.keys.versions(source, kind))
        for source in self.layout:
            pipe.hgetall(self.keys.meta(source))
        try:
            replies = await pipe.execute()
        except ResponseError as exc:  # WRONGTYPE and the like: Redis answered, with an error
            raise StoreUnreadable(f"Redis refused the read: {exc}") from None
        inited = bool(replies[1])
        try:
            return self._parse_state(replies, pairs), inited
        except StoreUnreadable:
            if not inited:
                return RawState(), False  # about to be re-seeded: what is left there does not matter
            raise

    def _parse_state(self, replies: list[Any], pairs: list[tuple[str, str]]) -> RawState:
        """The pipeline's replies as raw state; StoreUnreadable names the first value that is not
        what this instance wrote (the definitions' text is the compiler's business, not this)."""
        generation = replies[2]
        state = RawState(
            version=_integer(self.keys.version, replies[0] or "0"),
            generation=Generation(
                id=generation.get("id", ""),
                base_id=generation.get("base_id", ""),
                base_version=_integer(
                    f"{self.keys.generation} base_version", generation.get("base_version", "-1")
                ),
            ),
        )
        at = 3
        for source, kind in pairs:
            items, versions = replies[at], replies[at + 1]
            at += 2
            if items:
                state.data.setdefault(source, {})[kind] = items
            if versions:
                where = self.keys.versions(source, kind)
                state.item_versions.setdefault(source, {})[kind] = {
                    k: _integer(f"{where} {k}", v) for k, v in versions.items()
                }
        for source in self.layout:
            meta = replies[at]
            at += 1
            for name, value in meta.items():
                if name.endswith(":version"):
                    kind = name[: -len(":version")]
                    where = f"{self.keys.meta(source)} {name}"
                    state.source_versions.setdefault(source, {})[kind] = _integer(where, value)
        return state

    async def resync(self) -> None:
        """Read everything and adopt it, after writing this instance's state back first when Redis
        lost its data or holds an older state than this instance served (the highest version wins)."""
        async with self._lock:
            state, inited = await self._read_state()
            for _ in range(2):  # another instance may (re-)seed between this read and this seed
                mine = self._last_good
                if not inited:
                    await self._reseed(mine, restoring=False)
                elif mine is not None and (version := restore_version(mine, state)) is not None:
                    self._stepped_back("restored", mine, state)
                    await self._reseed(mine, restoring=True, version=version)
                else:
                    break
                state, inited = await self._read_state()
            if not inited:
                raise StoreUnavailable("Redis lost its data again while it was being re-seeded")
            current = self._last_good
            if current is not None and not holds(state, current):
                self._stepped_back("adopted", current, state)
            if (
                not self._ready
                or current is None
                or self._redis_version != state.version
                or state.generation != current.generation
                # a change that moved only a source version ("unchanged") is not announced
                or (state.data, state.item_versions, state.source_versions)
                != (current.data, current.item_versions, current.source_versions)
            ):
                await self._accept(state)
            self._unreadable = ""
            self._synced()

    def _stepped_back(self, outcome: str, mine: RawState, theirs: RawState) -> None:
        """Never silent: Redis holds a state older than, or not holding, what this instance served."""
        self.metrics.store_rolled_back(outcome)
        if outcome == "restored":
            log.error(
                "Redis holds version %d (generation %r), %s version %d (generation %r) served here: it "
                "lost its data and a staler state was re-seeded; writing this one back",
                theirs.version,
                theirs.generation.id,
                "older than" if theirs.version < mine.version else "another history under the same",
                mine.version,
                mine.generation.id,
            )
        else:
            log.error(
                "adopting Redis's version %d (generation %r, seeded from version %d of %r), which does "
                "not hold version %d (generation %r) served here: changes served here may be lost",
                theirs.version,
                theirs.generation.id,
                theirs.generation.base_version,
                theirs.generation.base_id,
                mine.version,
                mine.generation.id,
            )

    def _synced(self) -> None:
        """This instance holds exactly what Redis holds (after a full read or an applied change)."""
        self.metrics.synced("redis")

    async def _reseed(self, seed: RawState | None, restoring: bool, version: int | None = None) -> None:
        """Write ``seed`` (None: the flags file) as ``version`` (default: its own) and a new
        generation, if Redis is uninitialised or older — the script decides, atomically."""
        what = f"the last good snapshot (version {seed.version})" if seed is not None else "the flags file"
        base_id, base_version = origin(seed) if seed is not None else ("", -1)
        if seed is None:
            seed = self._fallback()
        hashes: dict[str, dict[str, str]] = {}
        for source, kinds in seed.data.items():
            for kind, items in kinds.items():
                hashes[self.keys.data(source, kind)] = items
        for source, kind_versions in seed.item_versions.items():
            for kind, versions in kind_versions.items():
                hashes[self.keys.versions(source, kind)] = {k: str(v) for k, v in versions.items()}
        for source, by_kind in seed.source_versions.items():
            hashes[self.keys.meta(source)] = {f"{kind}:version": str(v) for kind, v in by_kind.items()}
        clear = {
            name
            for source, kinds in self.layout.items()
            for kind in kinds
            for name in (self.keys.data(source, kind), self.keys.versions(source, kind))
        }
        clear |= {self.keys.meta(source) for source in self.layout} | set(hashes)
        payload = {
            "inited": self.keys.inited,
            "version_key": self.keys.version,
            "generation_key": self.keys.generation,
            "channel": self.keys.channel,
            "publish": self.publish,
            "version": seed.version if version is None else version,
            "generation": {"id": secrets.token_hex(8), "base_id": base_id, "base_version": base_version},
            "clear": sorted(clear),
            "hashes": {name: fields for name, fields in hashes.items() if fields},
        }
        reply = json.loads(await self._reseed_script(keys=[self.keys.version], args=[json.dumps(payload)]))
        if reply["status"] == "corrupt":
            raise StoreUnreadable(f"{self.keys.version} is not an integer")
        if reply["status"] == "seeded" and not restoring:
            if self._last_good is not None:  # it held this instance's state before: data lost
                log.error("Redis had no flagproxy data (init marker missing): re-seeded it from %s", what)
            else:  # a first start on an empty Redis (or one this instance never read)
                log.info("initialised Redis from %s (it held no flagproxy data)", what)

    async def _accept(self, state: RawState) -> None:
        await self.install(state, allow_older=True)
        self._redis_version = state.version
        self._last_good = state
        self._ready = True
        self._schedule_save()

    async def _on_message(self, data: str) -> None:
        try:
            message = json.loads(data)
            version = int(message["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed change announcement: %.200r", data)
            return
        await self._catch_up(
            version,
            message.get("source"),
            message.get("kind"),
            message.get("keys"),
            message.get("reseed"),
            message.get("generation"),
        )

    async def _catch_up(
        self, version: int, source: Any, kind: Any, keys: Any, reseed: Any = False, generation: Any = None
    ) -> None:
        """Apply the change announced as ``version``: incrementally when it is the next one of this
        instance's generation, else by a full read."""
        mine = self._last_good
        if reseed or (isinstance(generation, str) and mine is not None and generation != mine.generation.id):
            await self.resync()
            return
        if self._redis_version is not None and version <= self._redis_version:
            return
        incremental = (
            mine is not None
            and self._redis_version is not None
            and version == self._redis_version + 1
            and source in self.layout
            and kind in self.layout.get(source, ())
            and isinstance(keys, list)
        )
        if not incremental or not await self._apply_announced(version, source, kind, keys):
            await self.resync()

    async def _apply_announced(self, version: int, source: str, kind: str, keys: list[str]) -> bool:
        """Read just the announced keys; False when Redis is not where the announcement left it
        (lost its data, re-seeded, another generation): then only a full read will do."""
        async with self._lock:
            current = self._last_good
            if current is None or self._redis_version is None or version != self._redis_version + 1:
                return True  # a resync got here first
            pipe = self.redis.pipeline(transaction=True)
            pipe.hmget(self.keys.data(source, kind), keys)
            pipe.hmget(self.keys.versions(source, kind), keys)
            pipe.hget(self.keys.meta(source), f"{kind}:version")
            pipe.get(self.keys.version)
            pipe.hget(self.keys.generation, "id")
            pipe.exists(self.keys.inited)
            texts, versions, source_version, stored, generation, inited = await pipe.execute()
            if not inited or (generation or "") != current.generation.id:
                return False
            if _integer(self.keys.version, stored or "0") < version:
                return False
            state = RawState(
                version=version,
                data={s: dict(k) for s, k in current.data.items()},
                item_versions={s: dict(k) for s, k in current.item_versions.items()},
                source_versions={s: dict(k) for s, k in current.source_versions.items()},
                generation=current.generation,
            )
            if source_version is not None:  # kept for a re-seed: stale documents stay refused
                where = f"{self.keys.meta(source)} {kind}:version"
                state.source_versions.setdefault(source, {})[kind] = _integer(where, source_version)
            items = dict(state.data.setdefault(source, {}).get(kind, {}))
            item_versions = dict(state.item_versions.setdefault(source, {}).get(kind, {}))
            where = self.keys.versions(source, kind)
            for key, text, item_version in zip(keys, texts, versions, strict=True):
                if text is None:
                    items.pop(key, None)
                else:
                    items[key] = text
                if item_version is None:
                    item_versions.pop(key, None)
                else:
                    item_versions[key] = _integer(f"{where} {key}", item_version)
            state.data[source][kind] = items
            state.item_versions[source][kind] = item_versions
            await self._accept(state)
            self._synced()
            return True

    # --- writing ----------------------------------------------------------------------------------

    async def apply(self, change: Change) -> ApplyResult:
        keys = [
            self.keys.data(change.source, change.kind),
            self.keys.versions(change.source, change.kind),
            self.keys.meta(change.source),
            self.keys.version,
            self.keys.audit,
            self.keys.inited,
            self.keys.generation,
        ]
        if change.delivery:
            keys.append(self.keys.delivery(change.source, change.delivery))
        payload = change.payload(self.settings.audit_max)
        before = self.snapshot
        for attempt in range(2):
            mine = self._last_good
            payload["floor"] = mine.version if mine is not None else -1
            payload["generation"] = mine.generation.id if mine is not None else ""
            args = [json.dumps(payload, separators=(",", ":")), self.keys.channel, self.publish]
            reply = json.loads(await self._write(self._apply_script, keys, args))
            if reply["status"] == "corrupt":
                raise StoreUnavailable(f"Redis holds data this instance cannot use: {reply.get('detail')}")
            if reply["status"] not in ("uninitialized", "behind"):
                break
            if attempt:
                raise StoreUnavailable("Redis lost its data or stepped back, and could not be re-seeded")
            try:
                # Re-seeds an emptied Redis, or writes back the newer state served here; then the
                # change goes on top (nothing was written yet).
                await self.resync()
            except UNUSABLE as exc:
                raise StoreUnavailable(str(exc)) from None
        result = ApplyResult(
            status=reply["status"],
            version=int(reply.get("version", 0)),
            changed=_as_list(reply.get("changed")),
            ignored=_as_list(reply.get("ignored")),
            stored_source_version=int(reply["stored"]) if "stored" in reply else None,
        )
        if result.status == "applied":
            # Read your own writes: this instance serves the change before it answers.
            try:
                await self._catch_up(result.version, change.source, change.kind, result.changed)
            except UNUSABLE:
                log.warning("applied version %d but could not reload it yet; pub/sub will", result.version)
            self.applied(change, result, before)
        return result

    async def _write(self, script: AsyncScript, keys: list[str], args: list[str]) -> str:
        """Run a write script on a connection taken for it, to know whether a failure came before
        it was sent (StoreUnavailable: nothing applied) or after (StoreTimeout: Redis may still run
        it — a busy or paused Redis does, even once this side has given up)."""
        try:
            async with connect.connection_for(self.redis, self.keys.version) as connection:
                return await self._send_script(connection, script, keys, args)
        except connect.FAILURES as exc:  # no connection: nothing was sent
            await connect.refresh(self.redis)
            raise StoreUnavailable(str(exc)) from None

    async def _send_script(
        self, connection: AbstractConnection, script: AsyncScript, keys: list[str], args: list[str]
    ) -> str:
        try:
            await _alive(connection)
        except (RedisError, OSError, TimeoutError) as exc:  # nothing of the write was sent
            await connect.refresh(self.redis)
            raise StoreUnavailable(str(exc)) from None
        try:
            try:
                return await _run_script(connection, "EVALSHA", script.sha, keys, args)
            except NoScriptError:  # a definite answer, nothing ran: this Redis has not seen it yet
                return await _run_script(connection, "EVAL", str(script.script), keys, args)
        except BusyLoadingError as exc:  # Redis answered: it did not run the script
            raise StoreUnavailable(f"Redis refused the write: {exc}") from None
        except ResponseError as exc:
            if _error_code(exc) in REFUSED_BEFORE_RUNNING:
                await connect.refresh(self.redis)  # MOVED, READONLY: a failover moved the master
                raise StoreUnavailable(f"Redis refused the write: {exc}") from None
            # an error inside the script: what it wrote before failing stays written
            raise StoreTimeout(f"the write failed part-way in Redis: {exc}") from None
        except (RedisError, OSError, TimeoutError) as exc:
            refused = exc.__context__
            if isinstance(refused, ResponseError) and _error_code(refused) in REFUSED_BEFORE_RUNNING:
                # redis-py's Sentinel connection answers READONLY (a demoted master) with a
                # ConnectionError raised from it: a refusal all the same, nothing ran
                raise StoreUnavailable(f"Redis refused the write: {_error_code(refused)} {refused}") from None
            await connection.disconnect()  # a late answer must not be read as the next command's
            raise StoreTimeout(
                f"no answer from Redis within {self.settings.redis_timeout_s:g}s: {exc}"
            ) from None

    async def note(self, entry: dict[str, Any]) -> None:
        text = json.dumps({"time": now_iso(), **entry}, separators=(",", ":"))
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.keys.audit, text)
                pipe.ltrim(self.keys.audit, 0, max(0, self.settings.audit_max - 1))
                await pipe.execute()
        except connect.FAILURES as exc:
            raise StoreUnavailable(str(exc)) from None

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        try:
            entries = await self.redis.lrange(self.keys.audit, 0, max(0, limit - 1))
        except connect.FAILURES as exc:
            raise StoreUnavailable(str(exc)) from None
        out: list[dict[str, Any]] = []
        for text in entries:  # an entry written by anything else is skipped, not a 500
            with contextlib.suppress(ValueError):
                entry = json.loads(text)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    # --- the disk snapshot --------------------------------------------------------------------------

    def _schedule_save(self) -> None:
        if not self.settings.snapshot_path or self._save_handle is not None:
            return
        self._save_handle = asyncio.get_running_loop().call_later(0.2, self._save_soon)

    def _save_soon(self) -> None:
        self._save_handle = None
        state = self._last_good
        if state is not None:
            asyncio.get_running_loop().run_in_executor(None, self._save_quietly, state)

    def _save_now(self) -> None:
        self._save_handle = None
        if self._last_good is not None:
            self._save_quietly(self._last_good)

    def _save_quietly(self, state: RawState) -> None:
        with self._save_lock:  # saves run in worker threads: never let an older one land last
            if state.version < self._saved_version:
                return
            try:
                save_snapshot_file(self.settings.snapshot_path, state)
                self._saved_version = state.version
            except OSError as exc:
                log.error("could not write the snapshot file %s: %s", self.settings.snapshot_path, exc)
