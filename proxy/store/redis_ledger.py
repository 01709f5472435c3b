"""The lifecycle ledger (``proxy.store.ledger``) in Redis, beside the store's keys (docs/store.md,
"Redis layout"): first-seen times, usage merged by a Lua script, the daily digest's claims."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from proxy.store import connect
from proxy.store.base import StoreUnavailable
from proxy.store.ledger import UsageDelta

USAGE_LUA = """
-- KEYS[1] the usage hash; ARGV[1] [[key, fp, changed, last, [values]], ...] (proxy.store.ledger.merge_usage)
local batch = cjson.decode(ARGV[1])
for _, d in ipairs(batch) do
  local key, fp, changed, last, values = d[1], d[2], tonumber(d[3]), tonumber(d[4]), d[5]
  local rec = nil
  local raw = redis.call('HGET', KEYS[1], key)
  if raw then
    local ok, v = pcall(cjson.decode, raw)
    if ok and type(v) == 'table' then rec = v end
  end
  if rec == nil or (rec.fp ~= fp and changed >= (tonumber(rec.changed) or 0)) then
    local prev = 0
    if rec ~= nil then prev = tonumber(rec.last) or 0 end
    rec = {fp = fp, changed = changed, last = prev, values = {}}
  end
  if type(rec.values) ~= 'table' then rec.values = {} end
  if last > (tonumber(rec.last) or 0) then rec.last = last end
  if rec.fp == fp then
    for _, v in ipairs(values) do
      if #rec.values >= 2 then break end
      local found = false
      for _, w in ipairs(rec.values) do if w == v then found = true end end
      if not found then table.insert(rec.values, v) end
    end
  end
  redis.call('HSET', KEYS[1], key, cjson.encode(rec))
end
return #batch
"""


@contextlib.contextmanager
def unavailable_on_error(usable: Callable[[], bool]) -> Iterator[None]:
    """Redis errors as the store's own ``StoreUnavailable``; so is a store not in sync (``usable``)."""
    if not usable():
        raise StoreUnavailable("the store is not in sync with Redis")
    try:
        yield
    except connect.FAILURES as exc:
        raise StoreUnavailable(str(exc)) from None


class RedisLedger:
    """The lifecycle ledger (``proxy.store.ledger``) in Redis: shared by every instance. Used only
    while the store is in sync with Redis (``usable``): nothing is written into a Redis whose flag
    data this instance cannot read, or has not read yet; counters wait in memory meanwhile."""

    def __init__(
        self, redis: connect.AsyncClient, base: str, usable: Callable[[], bool] = lambda: True
    ) -> None:
        self.redis = redis
        self.usable = usable
        self.first_seen_key = f"{base}:lifecycle:first_seen"
        self.usage_key = f"{base}:lifecycle:usage"
        self.digest_prefix = f"{base}:lifecycle:digest:"
        self._usage_script = redis.register_script(USAGE_LUA)

    async def first_seen(self, times: Mapping[str, float]) -> dict[str, float]:
        with unavailable_on_error(self.usable):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, at in times.items():
                    pipe.hsetnx(self.first_seen_key, key, repr(at))
                pipe.hgetall(self.first_seen_key)
                replies = await pipe.execute()
        out: dict[str, float] = {}
        for key, value in (replies[-1] or {}).items():
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        return out

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        if deltas:
            batch = [[k, fp, changed, last, list(values)] for k, fp, changed, last, values in deltas]
            with unavailable_on_error(self.usable):
                await self._usage_script(keys=[self.usage_key], args=[json.dumps(batch)])

    async def usage(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with unavailable_on_error(self.usable):
            stored = await self.redis.hgetall(self.usage_key)
        for key, text in stored.items():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict):
                    if not isinstance(record.get("values"), list):
                        record["values"] = []  # Lua's cjson writes an empty list as {}
                    out[str(key)] = record
        return out

    async def claim_digest(self, day: str, keys: Sequence[str]) -> list[str]:
        if not keys:
            return []
        name = self.digest_prefix + day
        with unavailable_on_error(self.usable):
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hsetnx(name, key, "1")
                pipe.expire(name, 3 * 86400)
                replies = await pipe.execute()
        return [key for key, won in zip(keys, replies, strict=False) if won]
