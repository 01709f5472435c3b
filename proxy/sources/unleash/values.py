"""Context and constraint values read the way Unleash's engine (Yggdrasil, Rust) reads them.

Python's own parsers are more lenient than Rust's: ``float`` takes spaces, ``1_0`` and non-ASCII
digits, ``ipaddress`` takes IPv6 zone ids, ``datetime.fromisoformat`` takes a date alone. Each reader
here accepts exactly what the engine accepts and answers None otherwise (the constraint is then
false, before ``inverted``).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date
from typing import NamedTuple

# Rust's f64 grammar: a sign, then inf / infinity / nan (any case) or a decimal with an optional
# exponent; ASCII digits only, nothing around it.
_RUST_F64 = re.compile(r"[+-]?(?:inf|infinity|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)", re.I)


def rust_f64(text: str) -> float | None:
    """``text.parse::<f64>()``: a float, or None where Rust refuses it."""
    if _RUST_F64.fullmatch(text) is None:
        return None
    return float(text)


# chrono's ``DateTime<Utc>::from_str``: date, ``T``/``t``/space, time, any fraction, then ``Z`` or
# an offset with or without its colon.
_INSTANT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):?([0-9]{2}))"
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def instant_ns(text: str) -> int | None:
    """An RFC 3339 instant as nanoseconds since the epoch (UTC), or None when chrono refuses it."""
    match = _INSTANT.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, _z, sign, off_h, off_m = match.groups()
    try:
        ordinal = date(int(year), int(month), int(day)).toordinal()
    except ValueError:
        return None
    h, m, s = int(hour), int(minute), int(second)
    if h > 23 or m > 59 or s > 60:  # chrono reads a leap second (60) as the last second's end
        return None
    offset = 0
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            return None
        offset = (oh * 3600 + om * 60) * (1 if sign == "+" else -1)
    nanos = int((fraction or "0")[:9].ljust(9, "0"))
    if s == 60:
        s, nanos = 59, nanos + 1_000_000_000
    seconds = (ordinal - _EPOCH_ORDINAL) * 86400 + h * 3600 + m * 60 + s - offset
    return seconds * 1_000_000_000 + nanos


class Version(NamedTuple):
    """A SemVer 2.0 version; ``key`` orders by precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    pre: tuple[tuple[int, int | str], ...]

    @property
    def key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, self.pre)


_NUMBER = r"(?:0|[1-9][0-9]*)"
_IDENT = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"({_NUMBER})\.({_NUMBER})\.({_NUMBER})(?:-({_IDENT}(?:\.{_IDENT})*))?(?:\+{_IDENT}(?:\.{_IDENT})*)?"
)
_U64_MAX = (1 << 64) - 1


def semver(text: str) -> Version | None:
    """``semver::Version::parse``: strict SemVer 2.0 (no ``v``, no leading zeros, three parts)."""
    match = _SEMVER.fullmatch(text)
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups()[:3])
    if max(major, minor, patch) > _U64_MAX:
        return None
    pre: list[tuple[int, int | str]] = []
    for ident in (match.group(4) or "").split(".") if match.group(4) else ():
        if ident.isdigit():
            if len(ident) > 1 and ident[0] == "0":
                return None
            pre.append((0, int(ident)))  # numeric identifiers sort before alphanumeric ones
        else:
            pre.append((1, ident))
    return Version(major, minor, patch, tuple(pre))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_address(text: str) -> Address | None:
    """``IpAddr::from_str``: an IPv4 or IPv6 address exactly (no port, zone id or spaces)."""
    if "%" in text or not text.isascii():
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_network(text: str) -> Network | None:
    """``IpNetwork::from_str``: an address or CIDR; host bits may be set (``10.0.0.7/30``)."""
    address, _, prefix = text.partition("/")
    if ip_address(address) is None or (prefix and not prefix.isascii()):
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
