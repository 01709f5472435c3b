"""The shared experiment backend: Redis, written by every proxy instance of an environment.

Layout (``E`` = ``{prefix}:{environment}:exp``, ``F`` = the flag percent-encoded, ``%`` if empty;
docs/experiments.md, "Storage"). A flag's keys share the hash tag ``{F}``, so one script can touch
them all on Redis Cluster too:

- ``E:{F}:units``   hash  unit → ``<first_at>|<variant>`` (the first exposure; ``first_at`` has no ``|``)
- ``E:{F}:multi``   set   units exposed to more than one variant
- ``E:{F}:conv``    set   ``<len(goal)>:<goal><unit>``: the (goal, unit) pairs counted
- ``E:{F}:counts``  hash  ``u:<variant>`` exposed units, ``c:<len(goal)>:<goal><variant>`` converted
                          units, ``v:<len(goal)>:<goal><variant>`` sum of values, ``multiple``,
                          ``unattributed``, ``started_at``
- ``E:flags``       set   the flags written to (added before their scripts); ``flags()`` lists
                          those whose ``counts`` exist

Lengths are in UTF-8 bytes, so goals, units and variants may hold any character. Every batch is one
script per flag (``EVALSHA``, loaded again on ``NOSCRIPT``): atomic per experiment and first write
wins, whatever the number of instances. The script checks the key types before it writes anything,
and does its arithmetic in Lua (no ``HINCRBYFLOAT`` that could refuse half-way), so it never stops
with half a batch written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from proxy.config import StoreSettings
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
from proxy.store import connect

# KEYS: units, multi, conv, counts. ARGV: exposures count, conversions count, then per exposure
# unit, variant, at, then per conversion goal, unit, at, window_s, value ("" for none), final ("1"/"0").
# Returns one letter per record, in order.
APPLY_LUA = """
local units, multi, conv, counts = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local kinds = {{units, 'hash'}, {multi, 'set'}, {conv, 'set'}, {counts, 'hash'}}
for _, pair in ipairs(kinds) do
  local found = redis.call('TYPE', pair[1]).ok
  if found ~= 'none' and found ~= pair[2] then
    return redis.error_reply('WRONGTYPE ' .. pair[1] .. ' is a ' .. found .. ', not a ' .. pair[2])
  end
end
local exposures, conversions = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local i = 3
local started = redis.call('HGET', counts, 'started_at')
for _ = 1, exposures do
  local unit, variant, at = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  local first = redis.call('HGET', units, unit)
  if not first then
    redis.call('HSET', units, unit, at .. '|' .. variant)
    redis.call('HINCRBY', counts, 'u:' .. variant, 1)
    if (not started) or tonumber(at) < tonumber(started) then
      started = at
      redis.call('HSET', counts, 'started_at', at)
    end
    out[#out + 1] = 'n'
  elseif string.sub(first, string.find(first, '|', 1, true) + 1) == variant then
    out[#out + 1] = 'r'
  else
    if redis.call('SADD', multi, unit) == 1 then redis.call('HINCRBY', counts, 'multiple', 1) end
    out[#out + 1] = 'm'
  end
end
for _ = 1, conversions do
  local goal, unit, at, window, value = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
  local final = ARGV[i + 5] == '1'
  i = i + 6
  local first = redis.call('HGET', units, unit)
  if not first and not final then
    out[#out + 1] = 'y'
  elseif not first then
    redis.call('HINCRBY', counts, 'unattributed', 1)
    out[#out + 1] = 'u'
  else
    local bar = string.find(first, '|', 1, true)
    local first_at, variant = tonumber(string.sub(first, 1, bar - 1)), string.sub(first, bar + 1)
    local tag = #goal .. ':' .. goal
    if at < first_at then
      out[#out + 1] = 'b'
    elseif at > first_at + tonumber(window) then
      out[#out + 1] = 'o'
    elseif redis.call('SADD', conv, tag .. unit) == 0 then
      out[#out + 1] = 'd'
    else
      redis.call('HINCRBY', counts, 'c:' .. tag .. variant, 1)
      if value ~= '' then
        local field = 'v:' .. tag .. variant
        local sum = tonumber(redis.call('HGET', counts, field) or '0') + tonumber(value)
        redis.call('HSET', counts, field, string.format('%.17g', sum))
      end
      out[#out + 1] = 'c'
    end
  end
end
return table.concat(out)
"""

FAILURES: tuple[type[Exception], ...] = (*connect.FAILURES, UnicodeDecodeError)

OUTCOMES = {
    "n": EXPOSED,
    "r": REPEAT,
    "m": MULTIPLE,
    "c": COUNTED,
    "d": DUPLICATE,
    "u": UNATTRIBUTED,
    "y": NOT_EXPOSED_YET,
    "b": BEFORE_EXPOSURE,
    "o": OUTSIDE_WINDOW,
}


def number(value: float) -> str:
    """A float as the script reads it back exactly (``repr`` is the shortest round-trip form)."""
    return repr(float(value))


def composite(field: bytes) -> tuple[str, str]:
    """``<len(a)>:<a><b>`` → (a, b)."""
    length, _, rest = field.partition(b":")
    size = int(length)
    return rest[:size].decode(), rest[size:].decode()


class RedisKeys:
    def __init__(self, prefix: str, environment: str) -> None:
        self.base = f"{prefix}:{environment}:exp"
        self.flags = f"{self.base}:flags"

    def of(self, flag: str) -> list[str]:
        """units, multi, conv, counts: one hash tag, the flag percent-encoded (no ``{}`` in it; the
        empty flag is ``%``, which no encoding yields, since an empty tag ``{}`` hashes whole keys)."""
        tag = f"{self.base}:{{{quote(flag, safe='') or '%'}}}"
        return [f"{tag}:units", f"{tag}:multi", f"{tag}:conv", f"{tag}:counts"]


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str = "",
        prefix: str = "flagproxy",
        environment: str = "default",
        timeout_s: float = 2.0,
        settings: StoreSettings | None = None,
    ) -> None:
        """``settings``: the store's deployment (Sentinel, Cluster); else the one server at ``url``."""
        if settings is None:
            settings = StoreSettings(
                redis_url=url, redis_prefix=prefix, environment=environment, redis_timeout_s=timeout_s
            )
        self.where = connect.where(settings)
        # the keys carry their own per-flag hash tags: no store-wide tag, even on a Cluster
        self.keys = RedisKeys(settings.redis_prefix, settings.environment)
        self.timeout_s = settings.redis_timeout_s
        self._settings = settings
        self._redis: connect.SyncClient | None = None
        self._script: Script | None = None

    @property
    def redis(self) -> connect.SyncClient:
        """The client, made at the first use: a Cluster client reads the slots when it is made, and
        a Cluster away at start must be a failed batch (retried), not a proxy that cannot start."""
        if self._redis is None:
            # One retry, on a connection error only: a pooled connection to a Redis that went away
            # (and came back) is replaced at once. A timeout is not retried: the caller retries the batch.
            retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
            self._redis = connect.sync_client(self._settings, retry=retry)
            self._script = self._redis.register_script(APPLY_LUA)
        return self._redis

    @property
    def script(self) -> Script:
        """The apply script (``EVALSHA``, loaded again on ``NOSCRIPT``) on the client."""
        _ = self.redis
        assert self._script is not None
        return self._script

    # --- the protocol ------------------------------------------------------------------------------

    def apply(self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]) -> Applied:
        applied = Applied(exposures=[""] * len(exposures), conversions=[""] * len(conversions))
        by_flag: dict[str, tuple[list[int], list[int]]] = {}
        for index, exposure in enumerate(exposures):
            by_flag.setdefault(exposure.flag, ([], []))[0].append(index)
        for index, conversion in enumerate(conversions):
            by_flag.setdefault(conversion.flag, ([], []))[1].append(index)
        with self._errors("apply"):
            if by_flag:  # before the scripts: a writer dying between them leaves no data unlisted
                self.redis.sadd(self.keys.flags, *by_flag)
            for flag, (exposed, converted) in by_flag.items():
                args: list[str | int] = [len(exposed), len(converted)]
                for index in exposed:
                    e = exposures[index]
                    args += [e.unit, e.variant, number(e.at)]
                for index in converted:
                    c = conversions[index]
                    # a value that is not finite would make the sum say nothing: the conversion counts, not it
                    value = "" if c.value is None or not math.isfinite(c.value) else number(c.value)
                    args += [c.goal, c.unit, number(c.at), number(c.window_s), value, "1" if c.final else "0"]
                reply = self.script(keys=self.keys.of(flag), args=args)
                letters = reply.decode() if isinstance(reply, bytes) else ""
                if len(letters) != len(exposed) + len(converted):
                    raise BackendError(f"redis {self.where}: unexpected reply {reply!r} for {flag!r}")
                for index, letter in zip(exposed, letters, strict=False):
                    applied.exposures[index] = OUTCOMES[letter]
                for index, letter in zip(converted, letters[len(exposed) :], strict=True):
                    applied.conversions[index] = OUTCOMES[letter]
        return applied

    def counts(self, flag: str) -> Counts | None:
        with self._errors("counts"):
            fields: dict[Any, Any] = self.redis.hgetall(self.keys.of(flag)[3])
        if not fields:
            return None
        counts = Counts()
        try:
            for name, raw in fields.items():
                kind, _, rest = name.partition(b":")
                if kind == b"u":
                    counts.users[rest.decode()] = int(raw)
                elif kind == b"c":
                    goal, variant = composite(rest)
                    counts.conversions.setdefault(goal, {})[variant] = int(raw)
                elif kind == b"v":
                    goal, variant = composite(rest)
                    counts.values.setdefault(goal, {})[variant] = float(raw)
                elif name == b"started_at":
                    counts.started_at = float(raw)
                elif name == b"multiple":
                    counts.multiple_exposures = int(raw)
                elif name == b"unattributed":
                    counts.unattributed = int(raw)
        except ValueError as exc:  # UnicodeDecodeError too
            raise BackendError(f"redis {self.where}: counts of {flag!r} unreadable: {exc}") from None
        return counts

    def flags(self) -> list[str]:
        with self._errors("flags"):
            members: set[Any] = self.redis.smembers(self.keys.flags)
            flags = sorted(member.decode() for member in members)
            pipeline = self.redis.pipeline(transaction=False)
            for flag in flags:
                pipeline.exists(self.keys.of(flag)[3])
            found = pipeline.execute() if flags else []
        return [flag for flag, exists in zip(flags, found, strict=True) if exists]

    def reset(self, flag: str) -> bool:
        with self._errors("reset"):
            deleted: int = self.redis.delete(*self.keys.of(flag))
            self.redis.srem(self.keys.flags, flag)
        return deleted > 0

    def close(self) -> None:
        if self._redis is not None:
            connect.close(self._redis)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except FAILURES as exc:
            raise BackendError(f"redis {self.where}: {what} failed: {exc}") from None
