"""Semantic versions for the ``sem_ver`` operator (SemVer 2.0.0 precedence).

A leading ``v``/``V`` is ignored, missing minor/patch parts count as 0 (``"2"`` → 2.0.0) and build
metadata is ignored. ``^`` means "same major version", ``~`` "same major and minor version".
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple

SEMVER_OPS = frozenset({"=", "!=", "<", "<=", ">", ">=", "^", "~"})

_SEMVER = re.compile(
    r"^[vV]?(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?$"
)


# (major, minor, patch, 1 for a release else 0, prerelease): ordered by SemVer precedence.
VersionKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]


class Version(NamedTuple):
    major: int
    minor: int
    patch: int
    prerelease: tuple[tuple[int, int | str], ...]  # empty = release

    def key(self) -> VersionKey:
        # A release sorts after any of its pre-releases; numeric identifiers sort before alphanumeric.
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, self.prerelease)


def parse_semver(value: Any) -> Version | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > 256:
        return None
    return _parse(value)


@lru_cache(maxsize=4096)  # request attributes repeat (app versions): parse each string once
def _parse(value: str) -> Version | None:
    m = _SEMVER.match(value.strip())
    if m is None:
        return None
    pre: tuple[tuple[int, int | str], ...] = ()
    if m.group(4):
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in m.group(4).split("."))
    return Version(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), pre)


def version_key(value: Any) -> VersionKey | None:
    """The precedence key of a version string (cached), or None when it is not a version."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > 256:
        return None
    return _key(value)


@lru_cache(maxsize=4096)
def _key(value: str) -> VersionKey | None:
    version = _parse(value)
    return None if version is None else version.key()


def semver_matches(value: Version, op: str, target: Version) -> bool:
    return compare_keys(value.key(), op, target.key())


def compare_keys(a: VersionKey, op: str, b: VersionKey) -> bool:
    if op == "=":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    if op == "^":
        return a[0] == b[0]
    if op == "~":
        return a[:2] == b[:2]
    return False
