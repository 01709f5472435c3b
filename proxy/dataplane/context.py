"""Request context: who is calling and what we know about the request, for the engine.

The key comes from the first configured source that yields one (``[context] key_sources``):
a JWT claim (``Authorization: Bearer``), Telegram WebApp ``initData``, a header, a cookie or a query
parameter; the verified sources come first unless the operator orders otherwise (then a startup
warning says so). Callers with none get a random id in a sticky cookie, so they keep their variants;
with ``[context] cookie_secret`` that cookie is HMAC-signed and a forged one is ignored. ``path`` and
``method`` are always present; more attributes come from configured headers, query parameters and
JWT claims.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from proxy.asgi import Header, Scope
from proxy.config import ConfigError, ContextSettings

log = logging.getLogger("flagproxy.context")

KEY_SOURCES = ("header", "cookie", "query", "jwt", "telegram")
MAX_CREDENTIAL_BYTES = 8192  # a longer bearer token or initData is not verified (it is ignored)
_ENTRY_OVERHEAD = 112  # an OrderedDict slot and its link, beyond the digest and the value
MISS = object()


def parse_mapping(where: str, entries: tuple[str, ...]) -> dict[str, str]:
    """``("X-Country=country", "plan")`` → ``{"X-Country": "country", "plan": "plan"}``."""
    out = {}
    for entry in entries:
        source, sep, attr = entry.partition("=")
        source, attr = source.strip(), (attr.strip() if sep else source.strip())
        if not source or not attr:
            raise ConfigError(f"[context] {where}: {entry!r} is not NAME or NAME=attribute")
        out[source] = attr
    return out


def parse_cookies(header: str) -> dict[str, str]:
    cookies = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies[name] = value
    return cookies


def dotted(claims: Mapping[str, Any], path: str) -> Any:
    current: Any = claims
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return None
        current = current.get(part)
    return current


def key_string(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        text = str(value).strip()
        return text or None
    return None


def json_size(value: Any) -> int:
    """Bytes a decoded JSON value holds in memory: every container and scalar (shared ones each time)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class VerdictCache:
    """Verification results by a digest of the credential, least recently used first out.

    Bounded by bytes, not entries: each entry is accounted as its digest, its value (``json_size``)
    and a fixed slot overhead, so hostile credentials cannot make it grow past ``max_bytes``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # what the entries held now are accounted at
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(credential: str) -> bytes:
        return hashlib.blake2b(credential.encode("utf-8", "surrogatepass"), digest_size=32).digest()

    def get(self, digest: bytes) -> Any:
        """The value stored for ``digest``, or ``MISS``."""
        entry = self._entries.get(digest)
        if entry is None:
            return MISS
        self._entries.move_to_end(digest)
        return entry[0]

    def put(self, digest: bytes, value: Any) -> None:
        size = _ENTRY_OVERHEAD + sys.getsizeof(digest) + json_size(value)
        old = self._entries.pop(digest, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[digest] = (value, size)
        self.bytes += size


class JwtReader:
    """Claims from a bearer token; a token that fails verification yields nothing.

    Results are cached by a digest of the token, except failures that time can undo (``nbf`` or
    ``iat`` in the future): a token seen too early works once it is valid. A cached success is
    re-checked against its ``exp``.
    """

    def __init__(self, settings: ContextSettings) -> None:
        import jwt  # PyJWT: HS256 and RS256 (with cryptography)

        self._jwt = jwt
        self.verify = settings.jwt_verify
        self.require_exp = settings.jwt_require_exp
        self.audience = settings.jwt_audience or None
        self.issuer = settings.jwt_issuer or None
        self.key: Any = None
        self.algorithms: list[str] = []
        if settings.jwt_public_key:
            pem = settings.jwt_public_key
            if not pem.lstrip().startswith("-----BEGIN"):
                try:
                    pem = Path(pem).read_text()
                except OSError as exc:
                    raise ConfigError(f"[context] jwt_public_key: cannot read {pem!r}: {exc}") from None
            self.key, self.algorithms = pem, ["RS256"]
        elif settings.jwt_secret:
            self.key, self.algorithms = settings.jwt_secret, ["HS256"]
        self.enabled = self.key is not None or not self.verify
        self.cache = VerdictCache(settings.identity_cache_bytes)

    def claims(self, authorization: str) -> Mapping[str, Any] | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token = token.strip()
        if len(token) > MAX_CREDENTIAL_BYTES:
            return None
        digest = self.cache.digest(token)
        cached = self.cache.get(digest)
        if cached is not MISS:
            claims, expires = cached
            if claims is None or expires is None or expires > time.time():
                return claims  # type: ignore[no-any-return]  # the cache holds what _decode returned
        decoded, lasting = self._decode(token)
        if lasting:
            self.cache.put(digest, decoded)
        return decoded[0]

    def _decode(self, token: str) -> tuple[tuple[Mapping[str, Any] | None, float | None], bool]:
        """``((claims, exp), lasting)``: ``lasting`` is False for a verdict that time may change."""
        try:
            if self.key is None:
                claims = self._jwt.decode(token, options={"verify_signature": False})
            else:
                claims = self._jwt.decode(
                    token,
                    self.key,
                    algorithms=self.algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    options={"verify_aud": self.audience is not None},
                )
        except self._jwt.ImmatureSignatureError:  # nbf or iat ahead of our clock: not yet
            return (None, None), False
        except Exception:  # any malformed or unverifiable token is simply ignored
            return (None, None), True
        if not isinstance(claims, dict):
            return (None, None), True
        exp = claims.get("exp")
        if exp is None:
            return ((None, None) if self.require_exp else (claims, None)), True
        try:
            return (claims, float(int(exp))), True  # int() as PyJWT reads it
        except (TypeError, ValueError, OverflowError):
            return (None, None), True


class TelegramReader:
    """Telegram WebApp initData, verified with the bot token (HMAC-SHA256, "WebAppData" key)."""

    def __init__(self, settings: ContextSettings) -> None:
        self.secret = hmac.new(b"WebAppData", settings.telegram_bot_token.encode(), hashlib.sha256).digest()
        self.max_age_s = settings.telegram_max_age_s
        self.cache = VerdictCache(settings.identity_cache_bytes)

    def user(self, init_data: str) -> Mapping[str, Any] | None:
        if len(init_data) > MAX_CREDENTIAL_BYTES:
            return None
        digest = self.cache.digest(init_data)
        cached = self.cache.get(digest)
        if cached is MISS:
            cached = self._verify(init_data)  # no verdict here depends on the time: all are kept
            self.cache.put(digest, cached)
        if cached is None:
            return None
        auth_date, user = cached
        if self.max_age_s > 0 and time.time() - auth_date > self.max_age_s:
            return None
        return user  # type: ignore[no-any-return]  # the cache holds what _verify returned

    def _verify(self, init_data: str) -> tuple[int, Mapping[str, Any]] | None:
        try:
            pairs = dict(parse_qsl(init_data, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            return None
        received = pairs.pop("hash", "")
        check = "\n".join(f"{k}={v}" for k, v in sorted(pairs.items()))
        expected = hmac.new(self.secret, check.encode(), hashlib.sha256).hexdigest().encode()
        # bytes: compare_digest refuses str with non-ASCII characters (a hostile hash= would raise)
        if not received or not hmac.compare_digest(expected, received.lower().encode()):
            return None
        try:
            auth_date = int(pairs["auth_date"])
            user = json.loads(pairs["user"])
        except (KeyError, ValueError, RecursionError):
            return None
        if not isinstance(user, dict) or key_string(user.get("id")) is None:
            return None
        return auth_date, user


class ContextBuilder:
    """Turns an ASGI scope into the engine's context mapping (``key``, ``path``, ``method``, ...)."""

    def __init__(
        self, settings: ContextSettings, bucketing_key_header: str = "", trusted_proxies: tuple[str, ...] = ()
    ) -> None:
        self.settings = settings
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self.client_attr = settings.client_address_attribute
        self.bucketing_header = (
            bucketing_key_header.lower().encode("latin-1") if bucketing_key_header else None
        )
        for source in settings.key_sources:
            if source not in KEY_SOURCES:
                raise ConfigError(
                    f"[context] key_sources: unknown source {source!r} (use {', '.join(KEY_SOURCES)})"
                )
        self.key_header = settings.key_header.lower().encode("latin-1") if settings.key_header else None
        self.key_cookie = settings.key_cookie
        self.key_query = settings.key_query
        self.header_attrs = {
            k.lower().encode("latin-1"): v
            for k, v in parse_mapping("header_attributes", settings.header_attributes).items()
        }
        self.query_attrs = parse_mapping("query_attributes", settings.query_attributes)
        self.jwt_attrs = parse_mapping("jwt_attributes", settings.jwt_attributes)
        self.cookie_attrs = parse_mapping("cookie_attributes", settings.cookie_attributes)
        self.jwt = JwtReader(settings) if (settings.jwt_claim or self.jwt_attrs) else None
        if self.jwt is not None and not self.jwt.enabled:
            self.jwt = None
        self.telegram = TelegramReader(settings) if settings.telegram_bot_token else None
        self.telegram_header = settings.telegram_header.lower().encode("latin-1")
        self.anonymous_cookie = settings.anonymous_cookie
        self.cookie_key = settings.cookie_secret.encode() if settings.cookie_secret else None
        self.cookie_suffix = f"; Path=/; Max-Age={settings.anonymous_max_age_s}; HttpOnly; SameSite=Lax"
        if settings.anonymous_cookie_secure:
            self.cookie_suffix += "; Secure"
        self.sources = [s for s in settings.key_sources if self._configured(s)]
        self._warn_unverified_first()
        self.needs_cookies = bool(self.key_cookie or self.anonymous_cookie or self.cookie_attrs)
        self.needs_query = bool(self.key_query or self.query_attrs)

    def _configured(self, source: str) -> bool:
        return {
            "header": self.key_header is not None,
            "cookie": bool(self.key_cookie),
            "query": bool(self.key_query),
            "jwt": self.jwt is not None and bool(self.settings.jwt_claim),
            "telegram": self.telegram is not None,
        }[source]

    def _verified(self, source: str) -> bool:
        return source == "telegram" or (source == "jwt" and self.settings.jwt_verify)

    def _warn_unverified_first(self) -> None:
        """The operator's order is kept, but a claim anyone can make before a verified one is said."""
        first = next((i for i, s in enumerate(self.sources) if self._verified(s)), 0)
        if first > 0:
            log.warning(
                "[context] key_sources lists unverified %s before verified %s: a caller can choose its "
                "key just by sending one; list %s first unless that is intended",
                ", ".join(self.sources[:first]),
                self.sources[first],
                " and ".join(s for s in self.sources if self._verified(s)),
            )

    def build(self, scope: Scope) -> tuple[dict[str, Any], list[Header]]:
        """Return the context and any response headers the caller must get (a new sticky cookie)."""
        context: dict[str, Any] = {"path": scope["path"], "method": scope["method"]}
        header_key = cookie_header = authorization = init_data = None
        attrs = self.header_attrs
        forwarded: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for" and self.client_attr:
                forwarded.append(value)
            if name == self.key_header:
                header_key = value
            elif name == self.bucketing_header and value:
                context["bucketingKey"] = value.decode("latin-1").strip()
            elif name == b"cookie":
                cookie_header = value if cookie_header is None else cookie_header + b"; " + value
            elif name == b"authorization":
                authorization = value
            elif name == self.telegram_header:
                init_data = value
            if attrs and name in attrs:
                context[attrs[name]] = value.decode("latin-1").strip()

        query: dict[str, str] = {}
        if self.needs_query and scope.get("query_string"):
            query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            for param, attr in self.query_attrs.items():
                if param in query:
                    context[attr] = query[param]
        cookies = (
            parse_cookies(cookie_header.decode("latin-1")) if cookie_header and self.needs_cookies else {}
        )
        for cookie_name, attr in self.cookie_attrs.items():
            if cookie_name in cookies:
                context[attr] = cookies[cookie_name]
        if self.client_attr:
            address = self.client_address(scope.get("client"), forwarded)
            if address is not None:
                context[self.client_attr] = address
        claims = None
        if self.jwt is not None and authorization:
            claims = self.jwt.claims(authorization.decode("latin-1"))
            if claims is not None:
                for claim, attr in self.jwt_attrs.items():
                    value = dotted(claims, claim)
                    if value is not None:
                        context[attr] = value

        key = None
        for source in self.sources:
            if source == "header" and header_key:
                key = key_string(header_key.decode("latin-1"))
            elif source == "cookie":
                key = key_string(cookies.get(self.key_cookie))
            elif source == "query":
                key = key_string(query.get(self.key_query))
            elif source == "jwt" and claims is not None:
                key = key_string(dotted(claims, self.settings.jwt_claim))
            elif source == "telegram" and init_data and self.telegram is not None:
                user = self.telegram.user(init_data.decode("latin-1"))
                if user is not None:
                    key = key_string(user.get("id"))
            if key is not None:
                context["key"] = key
                return context, []

        if not self.anonymous_cookie:
            return context, []
        anonymous = self._anonymous_id(cookies.get(self.anonymous_cookie))
        if anonymous is not None:
            context["key"] = anonymous
            return context, []
        anonymous = secrets.token_hex(16)
        context["key"] = anonymous
        value = anonymous if self.cookie_key is None else f"{anonymous}.{self._sign(anonymous)}"
        cookie = f"{self.anonymous_cookie}={value}{self.cookie_suffix}".encode("latin-1")
        return context, [(b"set-cookie", cookie)]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def client_address(self, peer: Any, forwarded: list[bytes]) -> str | None:
        """The caller's address: the peer's, or — when the peer is a trusted proxy — the nearest
        address in ``X-Forwarded-For`` that is not a trusted proxy (read from the right)."""
        host = peer[0] if isinstance(peer, tuple | list) and peer else None
        if not isinstance(host, str):
            return None
        if not forwarded or not self._trusted(host):
            return host
        hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else host

    def _sign(self, anonymous: str) -> str:
        assert self.cookie_key is not None
        return hmac.new(self.cookie_key, anonymous.encode("ascii"), hashlib.sha256).hexdigest()

    def _anonymous_id(self, value: str | None) -> str | None:
        """The id in an anonymous cookie, or None: absent, malformed, or (with ``cookie_secret``)
        unsigned or signed wrongly — the caller then gets a fresh id."""
        if not value or not value.isascii():
            return None
        if self.cookie_key is None:
            return value if len(value) <= 64 else None
        anonymous, dot, signature = value.rpartition(".")
        if not dot or not anonymous or len(anonymous) > 64:
            return None
        if not hmac.compare_digest(self._sign(anonymous).encode(), signature.encode()):
            return None
        return anonymous


# --- a context from a key and attributes (offline evaluation, the admin preview) -----------------------


def make_context(key: Any, attributes: Mapping[str, Any], bucketing_key: Any = None) -> dict[str, Any]:
    context: dict[str, Any] = dict(attributes)
    if key is not None:
        context["key"] = _as_text(key)
    if bucketing_key is not None:
        context["bucketingKey"] = _as_text(bucketing_key)
    return context


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
