"""Client keys: who may call the client flags API, which flags each may see, and stream tokens.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. It is checked against every
configured key, always all of them, comparing SHA-256 digests in constant time: neither the time nor
the answer says which key came close. Keys are never logged.

Browsers' ``EventSource`` cannot send headers, so the live-update stream also takes a short-lived
token, ``<key name>.<expiry>.<signature>``: the signature is an HMAC-SHA256 of the name and expiry
under the key itself, so a token works on every worker and instance that holds the key, is good
until its expiry (Unix seconds), and is not the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.config import ClientKeySettings

TOKEN_CONTEXT = b"flagproxy client stream token v1\n"
SIGNATURE_BYTES = 18  # 144 bits: 24 characters of base64url


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    secret: bytes
    digest: bytes  # SHA-256 of the secret: what a presented key is compared with
    globs: tuple[str, ...]

    def may_see(self, flag_key: str) -> bool:
        return any(fnmatchcase(flag_key, glob) for glob in self.globs)


def presented_key(authorization: str, api_key: str) -> str:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer``; "" when none."""
    if api_key:
        return api_key.strip()
    scheme, _, given = authorization.partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


class KeyRing:
    def __init__(self, entries: Sequence[ClientKeySettings]) -> None:
        self.keys = tuple(
            ClientKey(e.name, e.key.encode(), hashlib.sha256(e.key.encode()).digest(), tuple(e.flags))
            for e in entries
        )
        self.by_name = {key.name: key for key in self.keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, given: str) -> ClientKey | None:
        """The key ``given`` is, compared with every key (no early exit)."""
        if not given:
            return None
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    # --- stream tokens
    def mint(self, key: ClientKey, expiry: int) -> str:
        """A token for ``key`` good until ``expiry`` (Unix seconds)."""
        return f"{key.name}.{expiry}.{_signature(key, key.name, expiry)}"

    def redeem(self, token: str, now: float | None = None) -> ClientKey | None:
        """The key a token was minted for, if its signature holds and it has not expired."""
        name, _, rest = token.rpartition(".")
        name, _, expiry_text = name.rpartition(".")
        key = self.by_name.get(name)
        if key is None or not expiry_text.isdigit() or len(expiry_text) > 12:
            return None
        expiry = int(expiry_text)
        if not hmac.compare_digest(rest.encode("ascii", "replace"), _signature(key, name, expiry).encode()):
            return None
        if expiry < (time.time() if now is None else now):
            return None
        return key


def _signature(key: ClientKey, name: str, expiry: int) -> str:
    mac = hmac.new(key.secret, TOKEN_CONTEXT + f"{name}\n{expiry}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:SIGNATURE_BYTES]).decode("ascii")
