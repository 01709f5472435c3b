"""The rule language of Unleash's engine (Yggdrasil's ``strategy_grammar.pest``), parsed the same way.

Yggdrasil does not evaluate strategies directly: it rewrites each feature's strategies and
constraints into one rule text (``rules``) and parses that with a PEG grammar. Which comparison a
constraint gets therefore depends on the *shape of its value* (a ``NUM_GT`` whose value is a date
compares dates; a ``SEMVER_EQ`` of ``"10"`` compares numbers), and a value that breaks the grammar
turns the whole feature off. Parsing the same text with the same grammar reproduces all of that.

PEG semantics, as pest has them: ordered choice that commits to the first alternative that
succeeds, greedy repetition, and spaces or tabs allowed between the parts of non-atomic rules.
``parse`` returns the tree or raises ``RuleSyntaxError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

WHITESPACE = " \t"


class RuleSyntaxError(ValueError):
    """The rule text does not parse: Yggdrasil turns the feature off."""


class Field(NamedTuple):
    """A context value: ``user_id`` …, ``random`` (with its upper bound) or ``property`` (with a name)."""

    kind: str
    name: str = ""
    bound: int = 100


class Constraint(NamedTuple):
    """One constraint of the grammar; ``kind`` is the grammar rule, ``args`` its parts."""

    inverted: bool
    # rollout | ip | hostname | date | semver | numeric | boolean | fragment | regex | list | external
    kind: str
    args: tuple[object, ...]


class Expr(NamedTuple):
    """Terms joined by ``and``/``or``; ``ops[i]`` joins ``terms[i]`` and ``terms[i + 1]``."""

    terms: tuple[Expr | Constraint, ...]
    ops: tuple[str, ...]


Node = Expr | Constraint

_FIELDS = (
    ("user_id", "user_id"),
    ("session_id", "session_id"),
    ("remote_address", "remote_address"),
    ("app_name", "app_name"),
    ("environment", "environment"),
    ("current_time", "current_time"),
)
_ORDINALS = ("<=", ">=", "<", "==", ">")
_FRAGMENT_OPS = (
    "starts_with_any_ignore_case",
    "ends_with_any_ignore_case",
    "contains_any_ignore_case",
    "starts_with_any",
    "ends_with_any",
    "contains_any",
)
_DIGITS = "0123456789"
_ALNUM_DASH = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")


class _Fail(Exception):
    pass


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    # --- tokens ---

    def ws(self, i: int) -> int:
        text, n = self.text, len(self.text)
        while i < n and text[i] in WHITESPACE:
            i += 1
        return i

    def literal(self, i: int, word: str) -> int:
        if not self.text.startswith(word, i):
            raise _Fail
        return i + len(word)

    def digits(self, i: int, least: int = 1) -> int:
        start, text, n = i, self.text, len(self.text)
        while i < n and text[i] in _DIGITS:
            i += 1
        if i - start < least:
            raise _Fail
        return i

    def string(self, i: int) -> tuple[str, str, int]:
        """``"…"`` with ``\\"`` escapes → (raw inside, unescaped, end)."""
        text, n = self.text, len(self.text)
        if i >= n or text[i] != '"':
            raise _Fail
        j = i + 1
        while True:
            if text.startswith('\\"', j):
                j += 2
            elif j >= n:
                raise _Fail
            elif text[j] == '"':
                break
            else:
                j += 1
        raw = text[i + 1 : j]
        return raw, raw.replace('\\"', '"'), j + 1

    def num(self, i: int) -> tuple[str, int]:
        """``num = @{ int ~ ("." ~ ASCII_DIGIT*)? ~ (^"e" ~ int)? }``."""
        start = i
        i = self.int_(i)
        if self.text.startswith(".", i):
            i += 1
            while i < len(self.text) and self.text[i] in _DIGITS:
                i += 1
        if i < len(self.text) and self.text[i] in "eE":
            try:
                i = self.int_(i + 1)
            except _Fail:
                return self.text[start:i], i  # the exponent is optional: it ends before the "e"
        return self.text[start:i], i

    def int_(self, i: int) -> int:
        if i < len(self.text) and self.text[i] in "+-":
            i += 1
        return self.digits(i)

    def semver(self, i: int) -> tuple[str, int]:
        start = i
        i = self.digits(i)
        i = self.digits(self.literal(i, "."))
        i = self.digits(self.literal(i, "."))
        for mark in "-+":
            if self.text.startswith(mark, i):
                with contextlib.suppress(_Fail):  # optional: the version ends before the mark
                    i = self.fragment(i + 1)
        return self.text[start:i], i

    def fragment(self, i: int) -> int:
        def ident(j: int) -> int:
            k = j
            while k < len(self.text) and self.text[k] in _ALNUM_DASH:
                k += 1
            if k == j:
                raise _Fail
            return k

        i = ident(i)
        while self.text.startswith(".", i):
            try:
                i = ident(i + 1)
            except _Fail:
                break
        return i

    def date(self, i: int) -> tuple[str, int]:
        start = i

        def fixed(j: int, count: int) -> int:
            end = j + count
            if end > len(self.text) or not all(c in _DIGITS for c in self.text[j:end]):
                raise _Fail
            return end

        i = fixed(i, 4)
        i = fixed(self.literal(i, "-"), 2)
        i = fixed(self.literal(i, "-"), 2)
        i = fixed(self.literal(i, "T"), 2)
        i = fixed(self.literal(i, ":"), 2)
        i = fixed(self.literal(i, ":"), 2)
        if self.text.startswith(".", i):
            i = fixed(i + 1, 3)
        if self.text.startswith("Z", i):
            i += 1
        elif i < len(self.text) and self.text[i] in "+-":
            i = fixed(self.literal(fixed(i + 1, 2), ":"), 2)
        else:
            raise _Fail
        return self.text[start:i], i

    def bracketed(self, i: int, item: Callable[[int], tuple[str, int]]) -> tuple[list[str], int]:
        """``"[" ~ item ~ ("," ~ item)* ~ "]"``."""
        value, i = item(self.ws(self.literal(i, "[")))
        values = [value]
        while True:
            j = self.ws(i)
            if not self.text.startswith(",", j):
                break
            try:
                value, k = item(self.ws(j + 1))
            except _Fail:
                break
            values.append(value)
            i = k
        return values, self.literal(self.ws(i), "]")

    def string_list(self, i: int) -> tuple[list[str], int]:
        return self.bracketed(i, self.string_value)

    def string_value(self, i: int) -> tuple[str, int]:
        _, value, end = self.string(i)
        return value, end

    def numeric_list(self, i: int) -> tuple[list[str], int]:
        return self.bracketed(i, self.num)

    # --- rules ---

    def field(self, i: int) -> tuple[Field, int]:
        if self.text.startswith("random[", i):
            try:
                j = self.ws(i + 7)
                k = self.int_(j)
                end = self.literal(self.ws(k), "]")
                return Field("random", bound=int(self.text[j:k])), end
            except _Fail:
                pass
        if self.text.startswith("random", i):
            return Field("random"), i + 6
        for word, kind in _FIELDS:
            if self.text.startswith(word, i):
                return Field(kind), i + len(word)
        i = self.ws(self.literal(i, "context["))
        raw, _, i = self.string(i)
        return Field("property", name=raw), self.literal(self.ws(i), "]")

    def one_of(self, i: int, words: tuple[str, ...]) -> tuple[str, int]:
        for word in words:
            if self.text.startswith(word, i):
                return word, i + len(word)
        raise _Fail

    def rollout(self, i: int) -> tuple[tuple[object, ...], int]:
        if self.text.startswith("100", i):
            digits_end = i + 3
        else:
            digits_end = self.digits(i)
            digits_end = min(digits_end, i + 2)
        percent = int(self.text[i:digits_end])
        i = self.literal(self.ws(digits_end), "%")
        stickiness: list[Field] | None = None
        j = self.ws(i)
        if self.text.startswith("sticky on ", j):
            try:
                field, k = self.field(self.ws(j + 10))
                stickiness = [field]
                while True:
                    m = self.ws(k)
                    if not self.text.startswith("|", m):
                        break
                    try:
                        field, n = self.field(self.ws(m + 1))
                    except _Fail:
                        break
                    stickiness.append(field)
                    k = n
                i = k
            except _Fail:
                stickiness = None
        group: str | None = None
        j = self.ws(i)
        if self.text.startswith("with group_id of", j):
            try:
                _, group, i = self.string(self.ws(j + 16))
            except _Fail:
                group = None
        return (percent, tuple(stickiness) if stickiness is not None else None, group), i

    def constraint(self, i: int) -> tuple[Constraint, int]:
        inverted = 0
        while self.text.startswith("!", i):
            inverted += 1
            i = self.ws(i + 1)
        if inverted > 1:
            raise RuleSyntaxError("more than one '!' before a constraint")  # Yggdrasil panics here
        for attempt in (
            self.c_rollout,
            self.c_ip,
            self.c_hostname,
            self.c_date,
            self.c_semver,
            self.c_numeric,
            self.c_boolean,
            self.c_fragment,
            self.c_regex,
            self.c_list,
            self.c_external,
        ):
            try:
                kind, args, end = attempt(i)
            except _Fail:
                continue
            return Constraint(bool(inverted), kind, args), end
        raise _Fail

    def c_rollout(self, i: int) -> tuple[str, tuple[object, ...], int]:
        args, end = self.rollout(i)
        return "rollout", args, end

    def c_ip(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, i = self.field(i)
        i = self.literal(self.ws(i), "in_cidr")
        values, i = self.string_list(self.ws(i))
        return "ip", (field, values), i

    def c_hostname(self, i: int) -> tuple[str, tuple[object, ...], int]:
        i = self.literal(self.ws(self.literal(i, "hostname")), "in")
        values, i = self.string_list(self.ws(i))
        return "hostname", (values,), i

    def _ordinal(self, i: int) -> tuple[Field, str, int]:
        field, i = self.field(i)
        op, i = self.one_of(self.ws(i), _ORDINALS)
        return field, op, self.ws(i)

    def c_date(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, op, i = self._ordinal(i)
        value, i = self.date(i)
        return "date", (field, op, value), i

    def c_semver(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, op, i = self._ordinal(i)
        value, i = self.semver(i)
        return "semver", (field, op, value), i

    def c_numeric(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, op, i = self._ordinal(i)
        value, i = self.num(i)
        return "numeric", (field, op, value), i

    def c_boolean(self, i: int) -> tuple[str, tuple[object, ...], int]:
        word, i = self.one_of(i, ("true", "false"))
        return "boolean", (word == "true",), i

    def c_fragment(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, i = self.field(i)
        op, i = self.one_of(self.ws(i), _FRAGMENT_OPS)
        values, i = self.string_list(self.ws(i))
        return "fragment", (field, op, values), i

    def c_regex(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, i = self.field(i)
        op, i = self.one_of(self.ws(i), ("matches_regex_ignoring_case", "matches_regex"))
        _, pattern, i = self.string(self.ws(i))
        return "regex", (field, op == "matches_regex_ignoring_case", pattern), i

    def c_list(self, i: int) -> tuple[str, tuple[object, ...], int]:
        field, i = self.field(i)
        op, i = self.one_of(self.ws(i), ("in", "not_in"))
        i = self.ws(i)
        for kind, reader in (("numeric", self.numeric_list), ("string", self.string_list)):
            try:
                values, end = reader(i)
            except _Fail:
                continue
            return "list", (field, op, kind, values), end
        end = self.literal(i, "[]")
        return "list", (field, op, "empty", []), end

    def c_external(self, i: int) -> tuple[str, tuple[object, ...], int]:
        i = self.ws(self.literal(i, "external_value["))
        _, name, i = self.string(i)
        return "external", (name,), self.literal(self.ws(i), "]")

    def term(self, i: int) -> tuple[Node, int]:
        try:
            return self.constraint(i)
        except _Fail:
            pass
        i = self.ws(self.literal(i, "("))
        node, i = self.expr(i)
        return node, self.literal(self.ws(i), ")")

    def expr(self, i: int) -> tuple[Node, int]:
        first, i = self.term(i)
        terms: list[Node] = [first]
        ops: list[str] = []
        while True:
            j = self.ws(i)
            try:
                op, k = self.one_of(j, ("and", "or"))
                term, k = self.term(self.ws(k))
            except _Fail:
                break
            ops.append(op)
            terms.append(term)
            i = k
        if not ops:
            return first, i
        return Expr(tuple(terms), tuple(ops)), i


def parse(text: str) -> Node:
    """The whole rule text (``SOI ~ expr ~ EOI``) → its tree."""
    parser = _Parser(text)
    try:
        node, end = parser.expr(parser.ws(0))
    except _Fail:
        raise RuleSyntaxError(f"rule {text!r} does not parse") from None
    if parser.ws(end) != len(text):
        raise RuleSyntaxError(f"rule {text!r} does not parse at {end}")
    return node
