"""The upstream side: origins matched by path prefix, each with its own keep-alive pool."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from proxy.config import OriginSettings, Settings, header_budget

# What aiohttp would otherwise add on its own: the origin sees only what the client sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Header lines aiohttp adds on its own (see aiohttp ClientRequest.update_body_from_data).
CHUNKED_LINE = len("Transfer-Encoding: chunked\r\n")
EMPTY_LENGTH_LINE = len("Content-Length: 0\r\n")
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


def wire_size(headers: list[tuple[str, str]]) -> int:
    """Bytes of ``name: value\\r\\n`` lines as aiohttp writes them (values in UTF-8)."""
    total = 0
    for name, value in headers:
        total += len(name) + 4 + (len(value) if value.isascii() else len(value.encode("utf-8")))
    return total


def head_size(method: str, target: str, headers: list[tuple[str, str]], has_body: bool) -> int:
    """The request head exactly as aiohttp writes it: request line, headers, what it adds, blank line."""
    head = len(method) + len(target) + 12 + wire_size(headers) + 2
    if not any(name == "content-length" for name, _ in headers):
        if has_body:
            head += CHUNKED_LINE  # aiohttp frames a streamed body without a length as chunked
        elif method not in BODYLESS_METHODS:
            head += EMPTY_LENGTH_LINE  # and declares an empty body on POST/PUT/PATCH/DELETE
    return head


@dataclass
class Origin:
    """One upstream, matched by raw path prefix (on segment boundaries)."""

    prefix: bytes  # normalised: no trailing slash, b"" for the root
    base: str  # scheme://host[:port]
    base_path: str  # path on the origin to prepend, no trailing slash
    netloc: bytes
    strip_prefix: bool
    rewrite_host: bool
    timeout: aiohttp.ClientTimeout
    pool_limit: int
    keepalive_timeout_s: float
    budget: int  # bytes of request line + headers the origin may receive
    alert_at: int  # alert when a request uses this many
    session: aiohttp.ClientSession | None = None
    label: str = field(init=False)  # the origin as metrics and logs name it: its route prefix

    def __post_init__(self) -> None:
        self.label = self.prefix.decode("latin-1") or "/"

    @classmethod
    def from_settings(cls, origin: OriginSettings, settings: Settings) -> Origin:
        parts = urlsplit(origin.url)
        up = settings.upstream
        connect = origin.connect_timeout_s or up.connect_timeout_s
        return cls(
            prefix=origin.prefix.rstrip("/").encode("latin-1"),
            base=f"{parts.scheme}://{parts.netloc}",
            base_path=parts.path.rstrip("/"),
            netloc=parts.netloc.encode("latin-1"),
            strip_prefix=origin.strip_prefix,
            rewrite_host=settings.proxy.rewrite_host if origin.rewrite_host is None else origin.rewrite_host,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=up.pool_timeout_s + connect,
                sock_connect=connect,
                sock_read=origin.read_timeout_s or up.read_timeout_s,
            ),
            pool_limit=origin.pool_limit or up.pool_limit,
            keepalive_timeout_s=up.keepalive_timeout_s,
            budget=(budget := header_budget(settings, origin)),
            alert_at=math.ceil(budget * settings.header.alert_ratio),
        )

    def matches(self, raw_path: bytes) -> bool:
        p = self.prefix
        return not p or raw_path == p or (raw_path.startswith(p) and raw_path[len(p) : len(p) + 1] == b"/")

    def target(self, raw_path: bytes, query: bytes) -> str:
        """The request target sent upstream, byte for byte: base path + (stripped) raw path + query."""
        path = raw_path[len(self.prefix) :] if self.strip_prefix else raw_path
        if not path.startswith(b"/"):
            path = b"/" + path
        target = self.base_path + path.decode("latin-1")
        if query:
            target += "?" + query.decode("latin-1")
        return target

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.pool_limit,
            limit_per_host=0,
            keepalive_timeout=self.keepalive_timeout_s,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Router:
    """Longest prefix wins."""

    def __init__(self, origins: list[Origin]) -> None:
        self.origins = sorted(origins, key=lambda o: len(o.prefix), reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls([Origin.from_settings(o, settings) for o in settings.origins])

    def match(self, raw_path: bytes) -> Origin | None:
        for origin in self.origins:
            if origin.matches(raw_path):
                return origin
        return None
