"""For origin apps: check that the flag headers really came from flagproxy. Standard library only.

With ``[header] signature_secret`` set, flagproxy adds::

    X-Feature-Flags-Signature: t=<unix seconds>,m=<method>,v1=<hex>,p=<path and query>

where ``v1`` is HMAC-SHA256 (key: the shared secret) over the lines::

    v1
    <t>
    <method>
    <path and query as the origin receives them>
    <X-Feature-Flags value>
    <X-Feature-Flags-Config value, or empty>
    <X-Feature-Flags-Omitted value, or empty>
    <X-Feature-Flags-Omitted-Keys value>   (this line only when that header is present)

joined with ``\\n``. A caller that reaches the origin directly cannot produce it, and a captured
header cannot be moved to another method or path or replayed after ``max_age_s``.

Example (any framework; here WSGI-style)::

    from proxy.origin import FlagSignatureError, verify_flags

    def feature_flags(environ):
        headers = {k[5:].replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")}
        target = environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        try:
            return verify_flags(headers, SECRET, max_age_s=60, method=environ["REQUEST_METHOD"], path=target)
        except FlagSignatureError:
            return {}  # unsigned or forged: use defaults
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FlagHeaderNames:
    """The flag header family, every name derived from one (flagproxy's ``[header] name``).

    ``config`` may be given explicitly (``[header] config_name``); it then still starts with
    ``<flags>-``, so one prefix covers the whole family.
    """

    flags: str = "X-Feature-Flags"
    config_override: str = ""

    @property
    def config(self) -> str:
        return self.config_override or f"{self.flags}-Config"

    @property
    def omitted(self) -> str:
        return f"{self.flags}-Omitted"

    @property
    def omitted_keys(self) -> str:
        return f"{self.flags}-Omitted-Keys"

    @property
    def signature(self) -> str:
        return f"{self.flags}-Signature"


DEFAULT_NAMES = FlagHeaderNames()


class FlagSignatureError(ValueError):
    """The flag headers are unsigned, forged, tampered with, for another request, or too old."""


def signing_string(
    timestamp: int, method: str, path: str, flags: str, config: str, omitted: str, omitted_keys: str = ""
) -> bytes:
    lines = ["v1", str(timestamp), method, path, flags, config, omitted]
    if omitted_keys:  # only when the header was sent: signatures without it are unchanged
        lines.append(omitted_keys)
    return "\n".join(lines).encode("utf-8")


def sign(
    secret: str,
    timestamp: int,
    method: str,
    path: str,
    flags: str,
    config: str = "",
    omitted: str = "",
    omitted_keys: str = "",
) -> str:
    """The ``X-Feature-Flags-Signature`` value (what flagproxy sends)."""
    mac = hmac.new(
        secret.encode("utf-8"),
        signing_string(timestamp, method, path, flags, config, omitted, omitted_keys),
        hashlib.sha256,
    )
    return f"t={timestamp},m={method},v1={mac.hexdigest()},p={path}"


def _lower(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        out[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return out


def parse_signature(value: str) -> tuple[int, str, str, str]:
    """``t=…,m=…,v1=…,p=…`` → (timestamp, method, mac, path); the path is everything after ``p=``."""
    head, sep, path = value.partition(",p=")
    if not sep:
        raise FlagSignatureError("malformed signature: no p=")
    fields = dict(part.split("=", 1) for part in head.split(",") if "=" in part)
    try:
        return int(fields["t"]), fields["m"], fields["v1"], path
    except (KeyError, ValueError):
        raise FlagSignatureError("malformed signature: expected t=, m=, v1=") from None


def verify_flags(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    secret: str,
    max_age_s: float = 300,
    *,
    method: str | None = None,
    path: str | None = None,
    now: float | None = None,
    names: FlagHeaderNames | str = DEFAULT_NAMES,
) -> dict[str, Any]:
    """The verified ``{flagKey: value}`` from the request's headers, or FlagSignatureError.

    Pass ``method`` and ``path`` (path and query as this origin received them) to make sure the
    signature was made for this very request; ``max_age_s`` bounds replays (clock skew included).
    ``names``: the proxy's ``[header] name`` (or a ``FlagHeaderNames``) when it is not the default.
    """
    if isinstance(names, str):
        names = FlagHeaderNames(names)
    lowered = _lower(headers)
    signature = lowered.get(names.signature.lower())
    if not signature:
        raise FlagSignatureError(f"no {names.signature} header")
    flags = lowered.get(names.flags.lower())
    if flags is None:
        raise FlagSignatureError(f"no {names.flags} header")
    timestamp, signed_method, _, signed_path = parse_signature(signature)
    expected = sign(
        secret,
        timestamp,
        signed_method,
        signed_path,
        flags,
        lowered.get(names.config.lower(), ""),
        lowered.get(names.omitted.lower(), ""),
        lowered.get(names.omitted_keys.lower(), ""),
    )
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise FlagSignatureError("signature does not match the flag headers")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > max_age_s:
        raise FlagSignatureError(f"signature is {age:.0f}s old (max {max_age_s:g}s)")
    if method is not None and method.upper() != signed_method.upper():
        raise FlagSignatureError(f"signed for method {signed_method}, not {method}")
    if path is not None and path != signed_path:
        raise FlagSignatureError("signed for another path")
    try:
        parsed = json.loads(flags)
    except ValueError:
        raise FlagSignatureError(f"{names.flags} is not JSON") from None
    if not isinstance(parsed, dict):
        raise FlagSignatureError(f"{names.flags} is not a JSON object")
    return parsed
