"""Regular expressions matched in linear time, whatever the pattern and the input (RE2).

Python's ``re`` backtracks: ``(a+)+$`` on 29 characters takes seconds, on the event loop. RE2 runs
an automaton instead — time linear in the input, memory bounded per pattern — at the price of the
features that need backtracking: backreferences, lookarounds, atomic groups and possessive
quantifiers are refused when the pattern is compiled (``PatternError``), so a definition using them
is rejected at load rather than served slowly.

Python spellings RE2 lacks are translated: ``\\Z`` → ``\\z``, ``\\uXXXX`` / ``\\UXXXXXXXX`` →
``\\x{...}``. Differences that remain (documented in docs/flags.md): ``\\d \\w \\s \\b`` are ASCII
only, and ``$`` matches at the very end of the text only (Python also matches before a final
``\\n``).

Values longer than ``MAX_INPUT_CHARS`` never match ``search`` (they are not scanned): request
context values are bounded anyway, and a bound that does not depend on the pattern is simple to
reason about.
"""

from __future__ import annotations

import re2

MAX_INPUT_CHARS = 8192
"""Longest value a targeting regex is matched against; a longer one does not match."""

MAX_PATTERN_MEMORY = 1 << 20
"""RE2's memory budget per compiled pattern (program and automaton cache, bytes). A pattern whose
program does not fit is refused; an automaton that outgrows it makes RE2 fall back to its (slower,
still linear) NFA."""


class PatternError(ValueError):
    """RE2 cannot compile the pattern; the message says why."""


def _options(max_mem: int) -> re2.Options:
    options = re2.Options()
    options.never_capture = True  # only "does it match" is ever asked
    options.log_errors = False  # the error goes into PatternError, not to stderr
    options.max_mem = max_mem
    return options


def _encode(text: str) -> bytes:
    # Lone surrogates (JSON allows "\ud800") must not raise on the request path.
    return text.encode("utf-8", "surrogatepass")


def translate(pattern: str) -> str:
    """Rewrite the Python escapes RE2 spells differently (``\\Z``, ``\\u``, ``\\U``); the rest stays."""
    if "\\" not in pattern:
        return pattern
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = pattern[i + 1]
        width = {"u": 4, "U": 8}.get(nxt, 0)
        digits = pattern[i + 2 : i + 2 + width]
        if nxt == "Z":
            out.append("\\z")
        elif width and len(digits) == width and all(d in "0123456789abcdefABCDEF" for d in digits):
            out.append(f"\\x{{{digits}}}")
            i += width
        else:
            out.append(pattern[i : i + 2])
        i += 2
    return "".join(out)


# The binding's own match loop (re2.Pattern.search) costs about 1 µs a call in Python around the
# C++ call; conditions only need "did it match", which the compiled RE2 object answers directly
# (about 0.4 µs). tests/test_linear_patterns.py checks both entry points agree.
_UNANCHORED = re2._Anchor.UNANCHORED
_ANCHOR_BOTH = re2._Anchor.ANCHOR_BOTH
_NO_MATCH = (-1, -1)


class Pattern:
    """One compiled pattern; ``search`` and ``fullmatch`` answer True or False."""

    __slots__ = ("_match", "_regex", "source")

    def __init__(self, source: str, max_mem: int = MAX_PATTERN_MEMORY) -> None:
        self.source = source
        try:
            self._regex = re2.compile(_encode(translate(source)), _options(max_mem))
        except re2.error as exc:
            reason = exc.args[0] if exc.args else "cannot be compiled"
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            shown = repr(source) if len(source) <= 200 else f"{source[:200]!r}… ({len(source)} characters)"
            raise PatternError(f"RE2 cannot compile {shown}: {reason}") from None
        self._match = self._regex._regexp.Match

    def search(self, text: str) -> bool:
        """Does the pattern occur in ``text``? Always False beyond ``MAX_INPUT_CHARS``."""
        if len(text) > MAX_INPUT_CHARS:
            return False
        encoded = _encode(text)
        return bool(self._match(_UNANCHORED, encoded, 0, len(encoded))[0] != _NO_MATCH)

    def fullmatch(self, text: str) -> bool:
        """Does the pattern match all of ``text`` (no length cap: callers bound their input)?"""
        encoded = _encode(text)
        return bool(self._match(_ANCHOR_BOTH, encoded, 0, len(encoded))[0] != _NO_MATCH)
