"""Redis store: flags shared by every proxy instance, changes fanned out by pub/sub.

Layout (``P`` = ``{redis_prefix}:{environment}``, see docs/store.md):

- ``P:{source}:{kind}``           hash  item key → definition JSON (``native:flags``, ``split:segments``…)
- ``P:{source}:{kind}:versions``  hash  item key → the source's own version of it (updatedAt ms, changeNumber)
- ``P:{source}:meta``             hash  ``{kind}:version`` → the source version last applied
- ``P:version``                   int   store version, +1 for every applied change
- ``P:inited``                    str   init marker: missing means Redis lost its data
- ``P:audit``                     list  newest first, capped
- ``P:changes``                   channel  ``{"version", "source", "kind", "keys"}`` per applied change

Every write is one Lua script (atomic, ordered by the source's versions). Each instance keeps a
compiled snapshot, applies announced changes incrementally, resyncs fully on a gap and every
``resync_interval_s``, re-seeds an emptied Redis from its last good state, and keeps serving that
state (and a copy on disk) while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import StoreSettings
from proxy.metrics import Metrics
from proxy.store.base import SnapshotHolder, StoreUnavailable
from proxy.store.change import Change
from proxy.store.state import ApplyResult, Compiler, RawState, layout

log = logging.getLogger("flagproxy.store")

APPLY_LUA = """
local data, vers, meta, verkey, audit, inited = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local p = cjson.decode(ARGV[1])
local channel = ARGV[2]
if redis.call('EXISTS', inited) == 0 then
  -- Redis lost its data (or was never seeded): writing now would make this change all there is.
  return cjson.encode({status = 'uninitialized'})
end
local sv = tonumber(p.source_version)
local svfield = p.kind .. ':version'
if sv >= 0 then
  local cur = tonumber(redis.call('HGET', meta, svfield) or '-1')
  if sv <= cur then
    local version = tonumber(redis.call('GET', verkey) or '0')
    return cjson.encode({status = 'stale', stored = cur, version = version})
  end
end
local changed, actions, ignored, incoming = {}, {}, {}, {}
local function newer(key, ver)
  if ver < 0 then return true end
  local cur = redis.call('HGET', vers, key)
  return (not cur) or tonumber(cur) < ver
end
for _, item in ipairs(p.upsert) do
  local key, text, ver = item[1], item[2], tonumber(item[3])
  incoming[key] = true
  if newer(key, ver) then
    if redis.call('HGET', data, key) ~= text then
      redis.call('HSET', data, key, text)
      table.insert(changed, key)
      table.insert(actions, 'upsert')
    end
    if ver >= 0 then redis.call('HSET', vers, key, string.format('%d', ver)) end
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
  local key, ver = item[1], tonumber(item[2])
  if newer(key, ver) then
    if redis.call('HDEL', data, key) == 1 then
      table.insert(changed, key)
      table.insert(actions, 'delete')
    end
    if ver >= 0 then
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
local announcement = {version = version, source = p.source, kind = p.kind, keys = changed}
redis.call('PUBLISH', channel, cjson.encode(announcement))
return cjson.encode({status = 'applied', version = version, changed = changed, ignored = ignored})
"""

RESEED_LUA = """
local p = cjson.decode(ARGV[1])
if redis.call('EXISTS', p.inited) == 1 then return 0 end
for name, fields in pairs(p.hashes) do
  redis.call('DEL', name)
  for field, value in pairs(fields) do redis.call('HSET', name, field, value) end
end
local cur = tonumber(redis.call('GET', p.version_key) or '0')
if tonumber(p.version) > cur then redis.call('SET', p.version_key, string.format('%d', p.version)) end
redis.call('SET', p.inited, '1')
local version = tonumber(redis.call('GET', p.version_key) or '0')
redis.call('PUBLISH', p.channel, cjson.encode({version = version, reseed = true}))
return 1
"""


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # cjson encodes an empty array as {}


class RedisKeys:
    def __init__(self, prefix: str, environment: str) -> None:
        self.base = f"{prefix}:{environment}"
        self.version = f"{self.base}:version"
        self.inited = f"{self.base}:inited"
        self.audit = f"{self.base}:audit"
        self.channel = f"{self.base}:changes"

    def data(self, source: str, kind: str) -> str:
        return f"{self.base}:{source}:{kind}"

    def versions(self, source: str, kind: str) -> str:
        return f"{self.base}:{source}:{kind}:versions"

    def meta(self, source: str) -> str:
        return f"{self.base}:{source}:meta"


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
        self.keys = RedisKeys(settings.redis_prefix, settings.environment)
        timeout = settings.redis_timeout_s
        self.redis = Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
        )
        self._apply_script = self.redis.register_script(APPLY_LUA)
        self._reseed_script = self.redis.register_script(RESEED_LUA)
        self._fallback = fallback
        self._ready = False
        self._redis_version: int | None = None  # version of the last state read from Redis
        self._last_good: RawState | None = None  # last complete state from Redis or the disk snapshot
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._save_lock = threading.Lock()
        self._saved_version = -1
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_now()
        await self.redis.aclose()
        self.stop_compiling()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._sync_forever()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected:
                    self.metrics.redis_reconnects.inc()
                self.connected = False
                self.metrics.redis_connected.set(0)
                if not self._ready:
                    source = "disk snapshot" if self._last_good is not None else "flags file"
                    log.error("Redis unreachable at start (%s): serving the %s", exc, source)
                    self._ready = True
                else:
                    log.warning(
                        "Redis unavailable (%s): serving snapshot version %d; retrying in %.2fs",
                        exc,
                        self.snapshot.version,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            except Exception:
                log.exception("unexpected error in the Redis sync loop; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            else:
                delay = 0.05

    async def _sync_forever(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(
                self.keys.channel
            )  # first, so nothing published during the resync is missed
            await self.resync()
            if not self.connected:
                log.info("connected to Redis at store version %d", self.snapshot.version)
            self.connected = True
            self.metrics.redis_connected.set(1)
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + self.settings.resync_interval_s
            while True:
                wait = max(0.0, min(1.0, next_resync - loop.time()))
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None and message.get("type") == "message":
                    await self._on_message(message["data"])
                if loop.time() >= next_resync:
                    await self.resync()
                    next_resync = loop.time() + self.settings.resync_interval_s
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    # --- reading ----------------------------------------------------------------------------------

    async def _read_state(self) -> tuple[RawState, bool]:
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.version)
        pipe.exists(self.keys.inited)
        pairs = [(source, kind) for source, kinds in self.layout.items() for kind in kinds]
        for source, kind in pairs:
            pipe.hgetall(self.keys.data(source, kind))
            pipe.hgetall(self.keys.versions(source, kind))
        for source in self.layout:
            pipe.hgetall(self.keys.meta(source))
        replies = await pipe.execute()
        state = RawState(version=int(replies[0] or 0))
        inited = bool(replies[1])
        at = 2
        for source, kind in pairs:
            items, versions = replies[at], replies[at + 1]
            at += 2
            if items:
                state.data.setdefault(source, {})[kind] = items
            if versions:
                state.item_versions.setdefault(source, {})[kind] = {k: int(v) for k, v in versions.items()}
        for source in self.layout:
            meta = replies[at]
            at += 1
            for name, value in meta.items():
                if name.endswith(":version"):
                    state.source_versions.setdefault(source, {})[name[: -len(":version")]] = int(value)
        return state, inited

    async def resync(self) -> None:
        """Read everything; re-seed Redis first if it lost its data (no init marker)."""
        async with self._lock:
            state, inited = await self._read_state()
            if not inited:
                await self._reseed()
                state, inited = await self._read_state()
            current = self._last_good
            if (
                not self._ready
                or current is None
                or self._redis_version != state.version
                # a change that moved only a source version ("unchanged") is not announced
                or (state.data, state.item_versions, state.source_versions)
                != (current.data, current.item_versions, current.source_versions)
            ):
                await self._accept(state)
            self._synced()

    def _synced(self) -> None:
        """This instance holds exactly what Redis holds (after a full read or an applied change)."""
        self.metrics.synced("redis")

    async def _reseed(self) -> None:
        seed = self._last_good
        what = f"the last good snapshot (version {seed.version})" if seed is not None else "the flags file"
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
        payload = {
            "inited": self.keys.inited,
            "version_key": self.keys.version,
            "channel": self.keys.channel,
            "version": seed.version,
            "hashes": {name: fields for name, fields in hashes.items() if fields},
        }
        if await self._reseed_script(args=[json.dumps(payload)]):
            level = logging.ERROR if self._last_good is not None else logging.WARNING
            log.log(level, "Redis had no flagproxy data (init marker missing): re-seeded it from %s", what)

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
            version, message.get("source"), message.get("kind"), message.get("keys"), message.get("reseed")
        )

    async def _catch_up(self, version: int, source: Any, kind: Any, keys: Any, reseed: Any = False) -> None:
        """Apply the change announced as ``version``: incrementally when it is the next one, else resync."""
        if self._redis_version is not None and version <= self._redis_version and not reseed:
            return
        incremental = (
            not reseed
            and self._redis_version is not None
            and version == self._redis_version + 1
            and source in self.layout
            and kind in self.layout.get(source, ())
            and isinstance(keys, list)
        )
        if not incremental:
            await self.resync()
            return
        async with self._lock:
            if self._redis_version is None or version != self._redis_version + 1:
                return  # a resync got here first
            pipe = self.redis.pipeline(transaction=True)
            pipe.hmget(self.keys.data(source, kind), keys)
            pipe.hmget(self.keys.versions(source, kind), keys)
            pipe.hget(self.keys.meta(source), f"{kind}:version")
            texts, versions, source_version = await pipe.execute()
            current = self._last_good or RawState()
            state = RawState(
                version=version,
                data={s: dict(k) for s, k in current.data.items()},
                item_versions={s: dict(k) for s, k in current.item_versions.items()},
                source_versions={s: dict(k) for s, k in current.source_versions.items()},
            )
            if source_version is not None:  # kept for a re-seed: stale documents stay refused
                state.source_versions.setdefault(source, {})[kind] = int(source_version)
            items = dict(state.data.setdefault(source, {}).get(kind, {}))
            item_versions = dict(state.item_versions.setdefault(source, {}).get(kind, {}))
            for key, text, item_version in zip(keys, texts, versions, strict=True):
                if text is None:
                    items.pop(key, None)
                else:
                    items[key] = text
                if item_version is None:
                    item_versions.pop(key, None)
                else:
                    item_versions[key] = int(item_version)
            state.data[source][kind] = items
            state.item_versions[source][kind] = item_versions
            await self._accept(state)
            self._synced()

    # --- writing ----------------------------------------------------------------------------------

    async def apply(self, change: Change) -> ApplyResult:
        keys = [
            self.keys.data(change.source, change.kind),
            self.keys.versions(change.source, change.kind),
            self.keys.meta(change.source),
            self.keys.version,
            self.keys.audit,
            self.keys.inited,
        ]
        payload = json.dumps(change.payload(self.settings.audit_max), separators=(",", ":"))
        try:
            reply = json.loads(await self._apply_script(keys=keys, args=[payload, self.keys.channel]))
            if reply["status"] == "uninitialized":
                await self.resync()  # re-seeds Redis from the last good state, then the write goes on top
                reply = json.loads(await self._apply_script(keys=keys, args=[payload, self.keys.channel]))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(str(exc)) from None
        if reply["status"] == "uninitialized":
            raise StoreUnavailable("Redis has no flagproxy data and could not be re-seeded")
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
            except (RedisError, OSError, TimeoutError):
                log.warning("applied version %d but could not reload it yet; pub/sub will", result.version)
        return result

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        try:
            entries = await self.redis.lrange(self.keys.audit, 0, max(0, limit - 1))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(str(exc)) from None
        return [json.loads(e) for e in entries]

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
