"""The upstream side's data: origins matched by path prefix, and the timeouts each request runs under.

Timeouts resolve per request, most specific first: a ``[[routes]]`` table whose glob matches the
path (the glob with the most literal characters; the first declared on a tie), then the origin's
``[[origins]]`` table, then ``[upstream]`` / ``[server]``. ``0`` means no limit.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from proxy.config import ROUTE_TIMEOUTS, ConfigError, OriginSettings, RouteSettings, Settings, header_budget
from proxy.dataplane.paths import climbs
from proxy.engine.patterns import PatternError
from proxy.engine.routes import Matcher, glob_matcher
from proxy.store.bounded import BoundedCache


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; 0 = none."""

    connect: float  # TCP (and TLS) connect to the origin
    read: float  # request sent → the origin's first response byte
    stream_idle: float  # silence between response body chunks
    total: float  # request head received → response end
    body_idle: float  # silence inside the client's request body
    send_idle: float  # the client not reading what we send
    pool: float  # waiting for a free upstream connection


OVERRIDE_FIELDS = {
    "read_timeout_s": "read",
    "stream_idle_timeout_s": "stream_idle",
    "total_timeout_s": "total",
    "body_idle_timeout_s": "body_idle",
    "send_idle_timeout_s": "send_idle",
}
assert set(OVERRIDE_FIELDS) == set(ROUTE_TIMEOUTS)


def overridden(base: Timeouts, table: OriginSettings | RouteSettings) -> Timeouts:
    changes = {}
    for setting, name in OVERRIDE_FIELDS.items():
        value = getattr(table, setting, None)
        if value is not None:
            changes[name] = value
    connect = getattr(table, "connect_timeout_s", None)
    if connect:
        changes["connect"] = connect
    return replace(base, **changes) if changes else base


def global_timeouts(settings: Settings) -> Timeouts:
    up, server = settings.upstream, settings.server
    return Timeouts(
        connect=up.connect_timeout_s,
        read=up.read_timeout_s,
        stream_idle=up.stream_idle_timeout_s,
        total=up.total_timeout_s,
        body_idle=server.body_idle_timeout_s,
        send_idle=server.send_idle_timeout_s,
        pool=up.pool_timeout_s,
    )


@dataclass
class RouteTimeouts:
    """A ``[[routes]]`` table compiled: its glob (matched without backtracking) and its overrides."""

    matches: Matcher
    specificity: int
    table: RouteSettings

    @classmethod
    def compile(cls, table: RouteSettings) -> RouteTimeouts:
        literal = sum(1 for c in table.path if c not in "*?")
        try:
            return cls(glob_matcher(table.path), literal, table)
        except PatternError as exc:  # only a glob too large for RE2's memory budget
            raise ConfigError(f"[[routes]] path: {exc}") from None


@dataclass
class Origin:
    """One upstream, matched by path prefix (on segment boundaries) on the normalised path."""

    prefix: bytes  # normalised: no trailing slash, b"" for the root
    scheme: str
    host: str
    port: int
    base_path: bytes  # path on the origin to prepend, no trailing slash
    netloc: bytes
    strip_prefix: bool
    rewrite_host: bool
    timeouts: Timeouts
    pool_limit: int
    keepalive_timeout_s: float
    max_response_head_bytes: int
    budget: int  # bytes of request line + headers the origin may receive
    alert_at: int  # alert when a request uses this many
    routes: tuple[RouteTimeouts, ...] = ()
    label: str = field(init=False)  # the origin as metrics and logs name it: its route prefix
    _by_path: BoundedCache[Timeouts] = field(
        init=False, default_factory=lambda: BoundedCache(1 << 20), repr=False
    )  # paths are client input: bounded by bytes

    def __post_init__(self) -> None:
        self.label = self.prefix.decode("latin-1") or "/"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.netloc.decode('latin-1')}"

    @classmethod
    def from_settings(cls, origin: OriginSettings, settings: Settings) -> Origin:
        parts = urlsplit(origin.url)
        up = settings.upstream
        scheme = parts.scheme or "http"
        return cls(
            prefix=origin.prefix.rstrip("/").encode("latin-1"),
            scheme=scheme,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (443 if scheme == "https" else 80),
            base_path=parts.path.rstrip("/").encode("latin-1"),
            netloc=parts.netloc.encode("latin-1"),
            strip_prefix=origin.strip_prefix,
            rewrite_host=settings.proxy.rewrite_host if origin.rewrite_host is None else origin.rewrite_host,
            timeouts=overridden(global_timeouts(settings), origin),
            pool_limit=origin.pool_limit or up.pool_limit,
            keepalive_timeout_s=up.keepalive_timeout_s,
            max_response_head_bytes=up.max_response_head_bytes,
            budget=(budget := header_budget(settings, origin)),
            alert_at=math.ceil(budget * settings.header.alert_ratio),
            routes=tuple(RouteTimeouts.compile(r) for r in settings.routes),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.scheme == "https" else None

    def matches(self, raw_path: bytes) -> bool:
        p = self.prefix
        return not p or raw_path == p or (raw_path.startswith(p) and raw_path[len(p) : len(p) + 1] == b"/")

    def strips_safely(self, raw_path: bytes) -> bool:
        """With ``strip_prefix``: the raw path starts with the prefix as sent, and what is left of it
        stays below the base path as the origin reads it (``paths.normalise``)."""
        if not self.strip_prefix or not self.prefix:
            return True
        return self.matches(raw_path) and not climbs(raw_path[len(self.prefix) :] or b"/")

    def target(self, raw_path: bytes, query: bytes | None) -> bytes:
        """The request target sent upstream, byte for byte: base path + (stripped) raw path + query
        (``query`` None: the client sent no ``?``; ``b""``: a bare ``?``, kept)."""
        path = raw_path[len(self.prefix) :] if self.strip_prefix else raw_path
        if not path.startswith(b"/"):
            path = b"/" + path
        target = self.base_path + path
        if query is not None:
            target += b"?" + query
        return target

    def timeouts_for(self, path: str) -> Timeouts:
        """This origin's timeouts with the most specific ``[[routes]]`` table matching ``path`` (the
        decoded request path, as flag routes see it) applied."""
        if not self.routes:
            return self.timeouts
        found = self._by_path.get(path)
        if found is None:
            best: RouteTimeouts | None = None
            for route in self.routes:
                if route.matches(path) and (best is None or route.specificity > best.specificity):
                    best = route
            found = self.timeouts if best is None else overridden(self.timeouts, best.table)
            self._by_path.put(path, found)
        return found


class Router:
    """Longest prefix wins."""

    def __init__(self, origins: list[Origin]) -> None:
        self.origins = sorted(origins, key=lambda o: len(o.prefix), reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls([Origin.from_settings(o, settings) for o in settings.origins])

    def match(self, path: bytes) -> Origin | None:
        """The origin for a normalised path (``paths.normalise``, UTF-8), or None."""
        for origin in self.origins:
            if origin.matches(path):
                return origin
        return None
