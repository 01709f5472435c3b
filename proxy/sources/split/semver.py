"""Semantic versions as Split's SDK parses and orders them (the semver matchers' input and targets).

``parse_semver`` accepts ``major.minor.patch[-pre][+metadata]`` exactly where the SDK does (None
otherwise, cached); ``compare_semver`` orders two versions like the SDK: pre-releases before the
stable release, numeric pre-release parts compared as numbers, metadata ignored unless the
normalised texts are equal.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


class SplitSemver:
    """``major.minor.patch[-pre][+metadata]`` as Split parses it; ``version`` is the normalised text."""

    __slots__ = ("major", "minor", "patch", "pre", "stable", "version")

    def __init__(self, major: int, minor: int, patch: int, pre: tuple[str, ...], stable: bool, meta: str):
        self.major, self.minor, self.patch = major, minor, patch
        self.pre = pre
        self.stable = stable
        text = f"{major}.{minor}.{patch}"
        if pre:
            text += "-" + ".".join(pre)
        if meta:
            text += "+" + meta
        self.version = text


@lru_cache(maxsize=8192)
def parse_semver(text: str) -> SplitSemver | None:
    """A version, or None when Split would reject it."""
    body, plus, meta = text.partition("+")
    if plus and not meta:
        return None
    core, dash, pre_text = body.partition("-")
    pre: list[str] = []
    if dash:
        if not pre_text:
            return None
        for part in pre_text.split("."):
            if part.isnumeric():
                try:
                    part = str(int(part))
                except ValueError:
                    return None
            pre.append(part)
    numbers_ = core.split(".")
    if len(numbers_) != 3:
        return None
    try:
        major, minor, patch = (int(n) for n in numbers_)
    except ValueError:
        return None
    return SplitSemver(major, minor, patch, tuple(pre), not dash, meta)


def _sign(a: Any, b: Any) -> int:
    return 0 if a == b else (1 if a > b else -1)


def compare_semver(a: SplitSemver, b: SplitSemver) -> int:
    """-1, 0 or 1 as the SDK orders versions (metadata ignored unless the texts are equal)."""
    if a.version == b.version:
        return 0
    for x, y in ((a.major, b.major), (a.minor, b.minor), (a.patch, b.patch)):
        if x != y:
            return 1 if x > y else -1
    if a.stable != b.stable:
        return 1 if a.stable else -1
    for left, right in zip(a.pre, b.pre, strict=False):
        if left == right:
            continue
        if left.isnumeric() and right.isnumeric():
            return _sign(int(left), int(right))
        return _sign(left, right)
    return _sign(len(a.pre), len(b.pre))
