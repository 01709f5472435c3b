"""Split (Harness FME) feature flags, evaluated exactly as the official Python SDK 10.7.0 does.

Definitions come from a ``splitChanges`` response (spec 1.3 ``{"ff": {"d": [...]}, "rbs": {"d": [...]}}``
or spec 1.1 ``{"splits": [...]}``), standard segments from ``segmentChanges`` documents
(``{"name", "added", "removed", "since", "till"}``; members = set(added) - set(removed)).
Flags or rule-based segments whose ``status`` is not ``"ACTIVE"`` are dropped, as the SDK drops
them from storage (a missing ``status`` counts as ACTIVE here).

Everything is compiled once (``compile_split``) into engine ``Flag`` objects: matchers become closures
over frozensets, compiled regexes and parsed versions, each flag gets its own bucketing function
(murmur3 x86_32 for ``algo: 2``, the legacy Java-string hash otherwise, seeds handled as the SDK
does), and partitions become a 100-entry bucket → outcome table.

Evaluation context: ``ctx["key"]`` is the matching key, ``ctx.get("bucketingKey")`` the bucketing key
(default: the matching key); every other entry is an attribute, as given (numbers stay numbers).
``key`` and ``bucketingKey`` themselves are never attributes. Keys are validated like the SDK's
``get_treatment``: a non-blank string of at most 250 characters, or a finite number (converted with
``str``); anything else serves ``control`` for every flag.

Outcomes: ``Served.value`` is the treatment. ``Served.config`` is the treatment's ``configurations``
entry — a JSON *string* in Split — forwarded as the parsed JSON value when it parses (what origins
want), else as the raw string; ``has_config`` is true only when the treatment has a configuration.
``control`` never carries a configuration (as in the SDK).

Evaluation order (SDK ``Evaluator``): not found → ``control``; killed → ``defaultTreatment``;
prerequisites (each ``{"n", "ts"}`` evaluated with the same keys and attributes; a miss →
``defaultTreatment``, label ``prerequisites not met``); conditions in order, with the traffic
allocation check (``trafficAllocationSeed``) done when the first ROLLOUT condition is reached; no match
→ ``defaultTreatment``, label ``default rule``. ``explain`` reports the SDK impression label as
``reason``.

SDK behaviour reproduced on purpose:

- an unknown matcher type (e.g. ``IN_LARGE_SEGMENT``) replaces all of that flag's conditions with one
  ROLLOUT / ALL_KEYS condition serving ``control`` (label ``targeting rule type unsupported by sdk``);
  traffic allocation, kill and prerequisites still apply. In a rule-based segment the same template
  makes every non-excluded key a member. Logged once per flag.
- anything that raises during the SDK's evaluation (a missing rule-based segment, a seed that is not
  an integer, a dependency cycle, ...) serves ``control`` (label ``exception``), including for flags
  that depend on it. Cycles are cut at ``MAX_DEPTH`` nested evaluations.
- numeric matchers accept ints and int strings only; DATETIME reads the attribute as epoch seconds;
  string matchers JSON-encode non-string input; set matchers take ``set(value)`` (a string becomes its
  characters); ``IN_SEGMENT`` with an attribute only requires that attribute and still tests the
  matching key; ``ALL_KEYS``, ``IN_SPLIT_TREATMENT`` and ``IN_RULE_BASED_SEGMENT`` ignore attributes;
  the semver matchers use the SDK's own parser and comparison (metadata counts for EQUAL_TO and
  IN_LIST, not for ordering); an excluded rule-based segment that lists the key in its own
  ``excluded.keys`` ends the exclusion check (the SDK returns early there).
- a prerequisite miss with ``defaultTreatment: "control"`` falls through to the conditions.

Deliberate differences: a definition the SDK cannot parse at all (a missing required field, an invalid
regex, a partition size outside 0..100, an unknown ``dataType``, ...) makes the SDK reject the whole
``splitChanges`` payload; here only that flag is reported as a problem and not served. ``get_treatments``
in the SDK turns *every* flag of a batch into ``control`` when one raises; here each flag stands alone
(``get_treatment`` semantics). Fields the SDK requires but evaluation does not need (``trafficTypeName``,
``changeNumber``, ``status``, ``killed``, ``negate``, ``combiner``) default sensibly when missing.

Stored formats (``compile_source("split", kinds, cache)``, one JSON text per item):

- ``flags``: ``{flag name: the raw split JSON object}`` (as in ``ff.d[]``);
- ``segments``: ``{segment name: JSON list of member keys}`` (a segmentChanges object is accepted too);
- ``rbsegments``: ``{name: the raw rule-based segment JSON object}`` (as in ``rbs.d[]``).

Problems are keyed by flag name, or ``"segments:<name>"`` / ``"rbsegments:<name>"`` for other items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import mmh3

from proxy.engine import Flag, FlagError, Served, encode_json

log = logging.getLogger(__name__)

Context = Mapping[str, Any]
# A compiled matcher or condition: (matching key, bucketing key, context, depth) → bool; or a constant.
Test = Callable[[str, str, Context, int], bool]
# A compiled flag: (matching key, bucketing key, context, depth) → outcome, or → (outcome, label).
Core = Callable[[str, str, Context, int], Served]
LabelledCore = Callable[[str, str, Context, int], tuple[Served, Any]]

CONTROL = "control"
LABEL_KILLED = "killed"
LABEL_NO_CONDITION_MATCHED = "default rule"
LABEL_NOT_FOUND = "definition not found"
LABEL_NOT_IN_SPLIT = "not in split"
LABEL_EXCEPTION = "exception"
LABEL_PREREQUISITES_NOT_MET = "prerequisites not met"
LABEL_UNSUPPORTED = "targeting rule type unsupported by sdk"
REASON_INVALID_KEY = "invalid key"  # the SDK returns control without an impression (no label)

MAX_KEY_LENGTH = 250
MAX_DEPTH = 100  # nested flag / rule-based segment evaluations before giving up (a cycle)
NOT_ATTRIBUTES = frozenset({"key", "bucketingKey"})

CONTROL_SERVED = Served.make(CONTROL)
_EMPTY: frozenset[Any] = frozenset()


class _Unsupported(Exception):
    """A matcher type the Python SDK does not know."""


class _TooDeep(RuntimeError):
    """Nested evaluations went deeper than MAX_DEPTH: a dependency cycle."""


class _Missing(LookupError):
    """A rule-based segment that is not stored (the SDK fails on ``None.excluded``)."""


# --- hashing ---------------------------------------------------------------------------------------

_INT32_LOW = -(1 << 31) - 1  # the SDK's int32 wrap leaves these two boundary values untouched
_INT32_HIGH = 1 << 31
_HALF = 1 << 31


def _wrap_int32(value: int) -> int:
    if _INT32_LOW <= value <= _INT32_HIGH:
        return value
    return ((value + _HALF) & 0xFFFFFFFF) - _HALF


def legacy_hash(key: str, seed: int) -> int:
    """Split's legacy hash (``algo: 1``): Java ``String.hashCode`` folded with the seed; signed int32."""
    wrap = _wrap_int32
    acc = 0
    for code in map(ord, key):
        acc = wrap(wrap(31 * wrap(acc)) + code)
    return wrap(acc ^ wrap(seed))


def murmur_hash(key: str, seed: int) -> int:
    """MurmurHash3 x86_32 (``algo: 2``) of the UTF-8 key, seed as uint32; unsigned."""
    # mmh3 crashes the interpreter on str with lone surrogates: always give it bytes.
    return mmh3.hash(key.encode("utf-8"), seed & 0xFFFFFFFF, False)


def is_murmur(algo: Any) -> bool:
    """``HashAlgorithm(algo)``: 2 is murmur; anything else (missing, 1, invalid) is legacy."""
    return type(algo) in (int, float) and algo == 2


def bucket(key: str, seed: int, algo: Any = 2) -> int:
    """The SDK's bucket, 1..100: ``abs(hash(key, seed)) % 100 + 1``."""
    hashed = murmur_hash(key, seed) if is_murmur(algo) else legacy_hash(key, seed)
    return abs(hashed) % 100 + 1


def _bucketer(seed: Any, murmur: bool) -> Callable[[str], int]:
    """``bucketing key → bucket`` for one flag seed, specialised once."""
    if not isinstance(seed, int):

        def broken(key: str) -> int:  # the SDK raises here (e.g. ``None & 0xFFFFFFFF``)
            raise TypeError(f"seed {seed!r} is not an integer")

        return broken
    if murmur:
        unsigned = seed & 0xFFFFFFFF
        murmur3 = mmh3.hash

        def by_murmur(key: str) -> int:
            if key.isascii():
                return murmur3(key, unsigned, False) % 100 + 1
            return murmur3(key.encode("utf-8"), unsigned, False) % 100 + 1

        return by_murmur
    wrapped = _wrap_int32(seed)
    return lambda key: abs(legacy_hash(key, wrapped)) % 100 + 1


# --- semantic versions (the SDK's own parser and ordering) -----------------------------------------


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
    for x, y in zip(a.pre, b.pre, strict=False):
        if x == y:
            continue
        if x.isnumeric() and y.isnumeric():
            return _sign(int(x), int(y))
        return _sign(x, y)
    return _sign(len(a.pre), len(b.pre))


# --- matcher input conversions ---------------------------------------------------------------------


def _as_string(value: Any) -> str | None:
    """String matchers' input: strings as they are, anything else JSON-encoded (None if it cannot be)."""
    if type(value) is str:
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> Any:
    """Numeric matchers' input: ints and int strings; floats and booleans are rejected (None)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_semver(value: Any) -> SplitSemver | None:
    text = _as_string(value)
    return None if text is None else parse_semver(text)


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    try:
        decoded = json.loads(value.lower())
    except ValueError:
        return None
    return decoded if isinstance(decoded, bool) else None


def _truncate_day(seconds: Any) -> Any:
    return seconds - seconds % 86400


def _truncate_minute(seconds: Any) -> Any:
    return seconds - seconds % 60


def _members(values: Iterable[Any]) -> frozenset[Any] | tuple[Any, ...]:
    """A container for ``in`` tests: a frozenset, or a tuple when some value is unhashable."""
    values = list(values)
    try:
        return frozenset(values)
    except TypeError:
        return tuple(values)


# --- parsing documents -----------------------------------------------------------------------------


def _active(raw: Mapping[str, Any]) -> bool:
    return raw.get("status", "ACTIVE") == "ACTIVE"


def parse_split_changes(document: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A splitChanges body (spec 1.3 or 1.1) → ({flag: raw split}, {name: raw rule-based segment}).

    Items that are not ACTIVE are dropped (the SDK deletes them from storage).
    """
    if not isinstance(document, dict):
        raise FlagError("splitChanges", 'expected a JSON object ({"ff": ..., "rbs": ...} or {"splits": ...})')
    if "ff" in document:
        ff = document["ff"]
        if not isinstance(ff, dict) or not isinstance(ff.get("d", []), list):
            raise FlagError("ff", 'expected {"d": [split, ...], "s": since, "t": till}')
        flag_items = ff.get("d", [])
        rbs = document.get("rbs") or {}
        if not isinstance(rbs, dict) or not isinstance(rbs.get("d", []), list):
            raise FlagError("rbs", 'expected {"d": [rule-based segment, ...], "s": since, "t": till}')
        rbs_items = rbs.get("d", [])
    elif "splits" in document:
        flag_items = document["splits"]
        if not isinstance(flag_items, list):
            raise FlagError("splits", "expected a list of splits")
        rbs_items = []
    else:
        raise FlagError("splitChanges", 'expected "ff" (spec 1.3) or "splits" (spec 1.1)')
    return _by_name(flag_items, "ff.d"), _by_name(rbs_items, "rbs.d")


def _by_name(items: list[Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise FlagError(f"{where}[{i}]", "expected an object with a non-empty name")
        if _active(item):
            out[item["name"]] = item
        else:
            out.pop(item["name"], None)
    return out


def segment_members(document: Any, where: str = "segment") -> frozenset[Any]:
    """A segmentChanges document (``set(added) - set(removed)``) or a plain list of member keys."""
    if isinstance(document, list):
        return frozenset(document)
    if isinstance(document, dict):
        added = document.get("added") or []
        removed = document.get("removed") or []
        if isinstance(added, list) and isinstance(removed, list):
            try:
                return frozenset(added) - frozenset(removed)
            except TypeError:
                pass
    raise FlagError(where, 'expected a list of keys or {"name", "added": [...], "removed": [...]}')


def _matchers_of(raw: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    conditions = raw.get("conditions")
    for condition in conditions if isinstance(conditions, list) else ():
        group = condition.get("matcherGroup") if isinstance(condition, dict) else None
        matchers = group.get("matchers") if isinstance(group, dict) else None
        for matcher in matchers if isinstance(matchers, list) else ():
            if isinstance(matcher, dict):
                yield matcher


def referenced_segments(flags: Mapping[str, Any], rb_segments: Mapping[str, Any]) -> set[str]:
    """Standard segment names used by IN_SEGMENT matchers and rule-based exclusions."""
    names: set[str] = set()
    for raw in [*flags.values(), *rb_segments.values()]:
        if not isinstance(raw, dict):
            continue
        for matcher in _matchers_of(raw):
            data = matcher.get("userDefinedSegmentMatcherData")
            kind = matcher.get("matcherType")
            if kind == "IN_SEGMENT" and isinstance(data, dict) and isinstance(data.get("segmentName"), str):
                names.add(data["segmentName"])
        excluded = raw.get("excluded")
        for segment in (excluded.get("segments") or []) if isinstance(excluded, dict) else ():
            standard = isinstance(segment, dict) and segment.get("type") != "rule-based"
            if standard and isinstance(segment.get("name"), str):
                names.add(segment["name"])
    return names


def load_segments(directory: str | Path, names: Iterable[str]) -> dict[str, frozenset[Any]]:
    """``<directory>/<name>.json`` for each name; a missing file is an unknown (empty) segment."""
    out: dict[str, frozenset[Any]] = {}
    for name in sorted(names):
        path = Path(directory) / f"{name}.json"
        if not path.is_file():
            log.warning("split segment %r: %s not found; treated as empty", name, path)
            continue
        try:
            document = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FlagError(str(path), f"invalid JSON: {exc}") from None
        out[name] = segment_members(document, str(path))
    return out


# --- compilation -----------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()


def _warn_once(kind: str, name: str, message: str) -> None:
    if (kind, name) not in _warned:
        _warned.add((kind, name))
        log.warning("split %s %r: %s", kind, name, message)


def _negated(test: Test) -> Test:
    return lambda mk, bk, ctx, depth: not test(mk, bk, ctx, depth)


def _on_input(attribute: str | None, accept: Callable[[Any], bool]) -> Test | bool:
    """A matcher over its input: the attribute (missing or None → no match) or the matching key."""
    if attribute is None:
        return lambda mk, bk, ctx, depth: accept(mk)
    if attribute in NOT_ATTRIBUTES:
        return False

    def test(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        value = ctx.get(attribute)
        return value is not None and accept(value)

    return test


def _then_false(before: tuple[Test, ...]) -> Test:
    """Evaluate ``before`` (they may raise, as in the SDK's short-circuit AND), then fail."""

    def then_false(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        for test in before:
            if not test(mk, bk, ctx, depth):
                return False
        return False

    return then_false


def _all_of(tests: list[Test | bool]) -> Test | bool:
    """AND of matchers in order, constants folded (a constant False still lets earlier ones raise)."""
    live: list[Test] = []
    for test in tests:
        if test is True:
            continue
        if test is False:
            return _then_false(tuple(live)) if live else False
        live.append(test)  # type: ignore[arg-type]
    if not live:
        return True
    if len(live) == 1:
        return live[0]
    if len(live) == 2:
        first, second = live
        return lambda mk, bk, ctx, depth: first(mk, bk, ctx, depth) and second(mk, bk, ctx, depth)
    chain = tuple(live)

    def every(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        for t in chain:  # noqa: SIM110 -- a plain loop beats all(<generator>) on the hot path
            if not t(mk, bk, ctx, depth):
                return False
        return True

    return every


class _RuleBasedSegment:
    __slots__ = ("conditions", "excluded", "keys")

    def __init__(self, keys: Any, excluded: tuple[tuple[bool, Any], ...], conditions: tuple[Any, ...]):
        self.keys = keys  # excluded keys
        self.excluded = excluded  # (is standard segment, name)
        self.conditions = conditions  # tests; True = always matches


def _outcome_table(parts: list[tuple[Served | None, Any]]) -> tuple[Served | None, ...]:
    """bucket (1..100) → outcome: the first partition whose running total reaches the bucket."""
    table: list[Served | None] = [CONTROL_SERVED]
    for b in range(1, 101):
        covered: Any = 0
        chosen: Served | None = CONTROL_SERVED
        for served, size in parts:
            covered += size
            if covered >= b:
                chosen = served
                break
        table.append(chosen)
    return tuple(table)


class _Compiler:
    """Compiles one consistent set of flags, segments and rule-based segments."""

    def __init__(self, segments: Mapping[str, Iterable[Any]], problems: dict[str, str]) -> None:
        self.segments = {name: frozenset(keys) for name, keys in segments.items()}
        self.cores: dict[str, Core] = {}
        self.rbs: dict[str, _RuleBasedSegment] = {}
        self.problems = problems
        self.builders: dict[str, Callable[[Mapping[str, Any], str | None], Test | bool]] = {
            "ALL_KEYS": lambda raw, attr: True,
            "IN_SEGMENT": self._in_segment,
            "IN_RULE_BASED_SEGMENT": self._in_rule_based_segment,
            "IN_SPLIT_TREATMENT": self._in_split_treatment,
            "WHITELIST": self._whitelist,
            "STARTS_WITH": self._starts_with,
            "ENDS_WITH": self._ends_with,
            "CONTAINS_STRING": self._contains_string,
            "MATCHES_STRING": self._matches_string,
            "EQUAL_TO": self._numeric("unaryNumericMatcherData", "==", _truncate_day),
            "GREATER_THAN_OR_EQUAL_TO": self._numeric("unaryNumericMatcherData", ">=", _truncate_minute),
            "LESS_THAN_OR_EQUAL_TO": self._numeric("unaryNumericMatcherData", "<=", _truncate_minute),
            "BETWEEN": self._numeric("betweenMatcherData", "between", _truncate_minute),
            "EQUAL_TO_SET": self._set_matcher(lambda wl, s: wl == s),
            "CONTAINS_ALL_OF_SET": self._set_matcher(lambda wl, s: wl <= s),
            "CONTAINS_ANY_OF_SET": self._set_matcher(lambda wl, s: not wl.isdisjoint(s)),
            "PART_OF_SET": self._set_matcher(lambda wl, s: bool(s) and s <= wl),
            "EQUAL_TO_BOOLEAN": self._boolean,
            "EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: v.version == t.version),
            "GREATER_THAN_OR_EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: compare_semver(v, t) >= 0),
            "LESS_THAN_OR_EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: compare_semver(v, t) <= 0),
            "BETWEEN_SEMVER": self._between_semver,
            "IN_LIST_SEMVER": self._in_list_semver,
        }

    # --- nested evaluations ---

    def treatment_of(self, name: Any, mk: str, bk: str, ctx: Context, depth: int) -> Any:
        """Another flag's treatment for the same keys and attributes (``control`` if it does not exist)."""
        if depth >= MAX_DEPTH:
            raise _TooDeep(f"flag {name!r}: more than {MAX_DEPTH} nested evaluations (a cycle?)")
        core = self.cores.get(name)
        if core is None:
            return CONTROL
        return core(mk, bk, ctx, depth + 1).value

    def in_rule_based_segment(self, name: Any, mk: str, bk: str, ctx: Context, depth: int) -> bool:
        if depth >= MAX_DEPTH:
            raise _TooDeep(
                f"rule-based segment {name!r}: more than {MAX_DEPTH} nested evaluations (a cycle?)"
            )
        segment = self.rbs.get(name)
        if segment is None:
            raise _Missing(f"rule-based segment {name!r} is not defined")
        if mk in segment.keys:
            return False
        if self._excluded(segment.excluded, mk, bk, ctx, depth + 1):
            return False
        return self._any_condition(segment.conditions, mk, bk, ctx, depth + 1)

    def _excluded(
        self, excluded: tuple[tuple[bool, Any], ...], mk: str, bk: str, ctx: Context, depth: int
    ) -> bool:
        if depth >= MAX_DEPTH:
            raise _TooDeep(f"more than {MAX_DEPTH} nested rule-based segment exclusions (a cycle?)")
        for standard, name in excluded:
            if standard:
                if mk in self.segments.get(name, _EMPTY):
                    return True
                continue
            nested = self.rbs.get(name)
            if nested is None:
                raise _Missing(f"rule-based segment {name!r} is not defined")
            if mk in nested.keys:
                return False  # the SDK stops checking the remaining exclusions here
            if self._excluded(nested.excluded, mk, bk, ctx, depth + 1) or self._any_condition(
                nested.conditions, mk, bk, ctx, depth + 1
            ):
                return True
        return False

    @staticmethod
    def _any_condition(conditions: tuple[Any, ...], mk: str, bk: str, ctx: Context, depth: int) -> bool:
        for condition in conditions:  # noqa: SIM110 -- hot path: no generator
            if condition is True or condition(mk, bk, ctx, depth):
                return True
        return False

    # --- matchers ---

    def matcher(self, raw: Any) -> Test | bool:
        kind = raw["matcherType"]
        build = self.builders.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise _Unsupported(f"matcher type {kind!r} is not supported by the Python SDK")
        selector = raw.get("keySelector")
        attribute = selector.get("attribute") if isinstance(selector, dict) else None
        test = build(raw, attribute)
        if raw.get("negate", False):
            return (not test) if isinstance(test, bool) else _negated(test)
        return test

    def _in_segment(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        members = self.segments.get(raw["userDefinedSegmentMatcherData"]["segmentName"], _EMPTY)
        if not members or attribute in NOT_ATTRIBUTES:
            return False
        if attribute is None:
            return lambda mk, bk, ctx, depth: mk in members
        return lambda mk, bk, ctx, depth: ctx.get(attribute) is not None and mk in members

    def _in_rule_based_segment(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        name = raw["userDefinedSegmentMatcherData"]["segmentName"]
        if name is None:
            return False
        member = self.in_rule_based_segment
        return lambda mk, bk, ctx, depth: member(name, mk, bk, ctx, depth)

    def _in_split_treatment(self, raw: Mapping[str, Any], attribute: str | None) -> Test:
        data = raw["dependencyMatcherData"]
        name, treatments = data["split"], _members(data["treatments"])
        treatment_of = self.treatment_of
        return lambda mk, bk, ctx, depth: treatment_of(name, mk, bk, ctx, depth) in treatments

    @staticmethod
    def _whitelist(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        allowed = frozenset(raw["whitelistMatcherData"]["whitelist"])

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            return text is not None and text in allowed

        return _on_input(attribute, accept)

    @staticmethod
    def _affix(raw: Mapping[str, Any], attribute: str | None, method: Callable[..., bool]) -> Test | bool:
        items = frozenset(raw["whitelistMatcherData"]["whitelist"])
        if all(isinstance(i, str) for i in items):
            choices = tuple(items)

            def accept(value: Any) -> bool:
                text = value if type(value) is str else _as_string(value)
                return text is not None and method(text, choices)

        else:  # non-string items make the SDK raise once it reaches them: keep its iteration

            def accept(value: Any) -> bool:
                text = value if type(value) is str else _as_string(value)
                return text is not None and any(method(text, i) for i in items)

        return _on_input(attribute, accept)

    def _starts_with(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        return self._affix(raw, attribute, str.startswith)

    def _ends_with(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        return self._affix(raw, attribute, str.endswith)

    @staticmethod
    def _contains_string(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        items = frozenset(raw["whitelistMatcherData"]["whitelist"])
        parts = tuple(items)

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            if text is None:
                return False
            for part in parts:  # noqa: SIM110 -- hot path: no generator
                if part in text:
                    return True
            return False

        return _on_input(attribute, accept)

    @staticmethod
    def _matches_string(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        search = re.compile(raw["stringMatcherData"]).search

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            return text is not None and search(text) is not None

        return _on_input(attribute, accept)

    @staticmethod
    def _numeric(field: str, op: str, truncate: Callable[[Any], Any]) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            data = raw[field]
            kind = data["dataType"]
            shape: Callable[[Any], Any] | None
            if kind == "NUMBER":
                shape = None
                target: Callable[[Any], Any] = lambda v: v  # noqa: E731
            elif kind == "DATETIME":  # the definition holds milliseconds, the attribute epoch seconds
                shape = truncate
                target = lambda v: truncate(v / 1000)  # noqa: E731
            else:
                raise ValueError(f"unknown dataType {kind!r}")
            if op == "between":
                low, high = target(data["start"]), target(data["end"])

                def accept(value: Any) -> bool:
                    number = _as_int(value)
                    if number is None:
                        return False
                    if shape is not None:
                        number = shape(number)
                    return low <= number <= high

                return _on_input(attribute, accept)
            goal = target(data["value"])

            def compare(value: Any) -> bool:
                number = _as_int(value)
                if number is None:
                    return False
                if shape is not None:
                    number = shape(number)
                if op == "==":
                    return number == goal
                if op == ">=":
                    return number >= goal
                return number <= goal

            return _on_input(attribute, compare)

        return build

    @staticmethod
    def _set_matcher(relation: Callable[[frozenset[Any], set[Any]], bool]) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            allowed = frozenset(raw["whitelistMatcherData"]["whitelist"])

            def accept(value: Any) -> bool:
                try:
                    given = set(value)
                except TypeError:
                    return False
                return relation(allowed, given)

            return _on_input(attribute, accept)

        return build

    @staticmethod
    def _boolean(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        expected = raw["booleanMatcherData"]

        def accept(value: Any) -> bool:
            decoded = _to_bool(value)
            return decoded is not None and decoded == expected

        return _on_input(attribute, accept)

    @staticmethod
    def _target_semver(text: Any) -> SplitSemver | None:
        if not isinstance(text, str):  # the SDK fails to build the matcher (``None.find``)
            raise TypeError(f"expected a version string, got {text!r}")
        return parse_semver(text)

    def _semver_compare(
        self, relation: Callable[[SplitSemver, SplitSemver], bool]
    ) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            target = self._target_semver(raw.get("stringMatcherData"))
            if target is None:
                return False

            def accept(value: Any) -> bool:
                version = _as_semver(value)
                return version is not None and relation(version, target)

            return _on_input(attribute, accept)

        return build

    def _between_semver(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        data = raw.get("betweenStringMatcherData")
        start, end = self._target_semver(data["start"]), self._target_semver(data["end"])  # type: ignore[index]
        if start is None or end is None:
            return False

        def accept(value: Any) -> bool:
            version = _as_semver(value)
            return version is not None and compare_semver(start, version) <= 0 <= compare_semver(end, version)

        return _on_input(attribute, accept)

    def _in_list_semver(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        versions = set()
        for item in raw["whitelistMatcherData"]["whitelist"]:
            if item:
                parsed = self._target_semver(item)
                if parsed is not None:
                    versions.add(parsed.version)
        if not versions:
            return False
        allowed = frozenset(versions)

        def accept(value: Any) -> bool:
            version = _as_semver(value)
            return version is not None and version.version in allowed

        return _on_input(attribute, accept)

    # --- conditions, flags and rule-based segments ---

    def condition(self, raw: Mapping[str, Any]) -> tuple[bool, Test | bool, list[tuple[Any, Any]], Any]:
        """→ (is ROLLOUT, test, [(treatment, size)], label), in the SDK's parsing order."""
        partitions = []
        for part in raw.get("partitions") or []:
            treatment, size = part["treatment"], part["size"]
            if size < 0 or size > 100:
                raise ValueError(f"partition size {size!r} is outside 0..100")
            if treatment is not None and not isinstance(treatment, str):
                raise TypeError(f"treatment {treatment!r} is not a string")
            partitions.append((treatment, size))
        group = raw["matcherGroup"]
        tests = [self.matcher(m) for m in group["matchers"]]
        if group.get("combiner", "AND") != "AND":
            raise ValueError(f"combiner {group['combiner']!r} is not supported (only AND)")
        kind = raw.get("conditionType", "WHITELIST")
        if kind not in ("ROLLOUT", "WHITELIST"):
            raise ValueError(f"conditionType {kind!r} is not ROLLOUT or WHITELIST")
        return kind == "ROLLOUT", _all_of(tests), partitions, raw.get("label")

    def rule_based_segment(self, name: str, raw: Mapping[str, Any]) -> _RuleBasedSegment:
        try:
            conditions = [self.condition(c)[1] for c in raw.get("conditions") or []]
        except _Unsupported as exc:
            _warn_once("rule-based segment", name, f"{exc}; every key not excluded is a member")
            conditions = [True]
        excluded = raw.get("excluded") or {}
        keys = _members(excluded.get("keys") or [])
        segments = tuple(
            (segment.get("type") != "rule-based", segment["name"])
            for segment in excluded.get("segments") or []
        )
        return _RuleBasedSegment(keys, segments, tuple(c for c in conditions if c is not False))

    def flag(
        self, name: str, raw: Mapping[str, Any]
    ) -> tuple[Core, LabelledCore, tuple[Served, ...], Served]:
        """→ (core, labelled core, every outcome, the default outcome)."""
        default_treatment = raw["defaultTreatment"]
        if not isinstance(default_treatment, str):
            raise TypeError(f"defaultTreatment {default_treatment!r} is not a string")
        configurations = raw.get("configurations")
        if configurations and not isinstance(configurations, dict):
            raise TypeError("configurations must be an object of treatment → JSON string")
        outcomes: dict[str, Served] = {}

        def outcome(treatment: str | None) -> Served | None:
            if treatment is None:
                return None
            if treatment == CONTROL:
                return CONTROL_SERVED
            if treatment not in outcomes:
                outcomes[treatment] = _served(treatment, configurations)
            return outcomes[treatment]

        default = outcome(default_treatment)
        assert default is not None
        murmur = is_murmur(raw.get("algo"))
        allocation = raw.get("trafficAllocation")
        if allocation is None or not 0 <= allocation <= 100:
            allocation = 100
        prerequisites = tuple((p["n"], _members(p["ts"])) for p in raw.get("prerequisites") or [])

        try:
            conditions = [self.condition(c) for c in raw.get("conditions") or []]
        except _Unsupported as exc:
            _warn_once("flag", name, f"{exc}; the flag serves control")
            conditions = [(True, True, [(CONTROL, 100)], LABEL_UNSUPPORTED)]

        split_bucket = _bucketer(raw.get("seed"), murmur)
        before: list[tuple[Any, ...]] = []
        after: list[tuple[Any, ...]] = []
        target = before
        for is_rollout, test, partitions, label in conditions:
            if is_rollout:
                target = after
            if test is False:
                continue  # never matches; its position (first ROLLOUT) is already accounted for
            if not partitions:
                entry: tuple[Any, ...] = (test, CONTROL_SERVED, None, label)
            elif len(partitions) == 1 and partitions[0][1] == 100:
                entry = (test, outcome(partitions[0][0]), None, label)
            else:
                entry = (test, None, _outcome_table([(outcome(t), s) for t, s in partitions]), label)
            target.append(entry)
        check_allocation = allocation < 100 and any(c[0] for c in conditions)
        core, labelled = _make_core(
            killed=bool(raw.get("killed", False)),
            default=default,
            prerequisites=prerequisites,
            before=tuple(before),
            after=tuple(after),
            check_allocation=check_allocation,
            allocation=allocation,
            allocation_bucket=_bucketer(raw.get("trafficAllocationSeed"), murmur),
            split_bucket=split_bucket,
            treatment_of=self.treatment_of,
        )
        for _, _, partitions, _ in conditions:
            for treatment, _ in partitions:
                outcome(treatment)
        for treatment in configurations or {}:
            if isinstance(treatment, str):
                outcome(treatment)
        served = (*outcomes.values(), CONTROL_SERVED)  # outcome() never stores control itself
        return core, labelled, served, default


def _served(treatment: str, configurations: Mapping[str, Any] | None) -> Served:
    raw = configurations.get(treatment) if configurations else None
    if raw is None:
        return Served.make(treatment)
    if isinstance(raw, str):
        try:
            return Served.make(treatment, json.loads(raw), True)
        except ValueError:  # not JSON (or NaN/Infinity, which the header encoding refuses)
            return Served.make(treatment, raw, True)
    try:
        return Served.make(treatment, raw, True)
    except (TypeError, ValueError):
        return Served.make(treatment, str(raw), True)


def _make_core(
    *,
    killed: bool,
    default: Served,
    prerequisites: tuple[tuple[Any, Any], ...],
    before: tuple[tuple[Any, ...], ...],
    after: tuple[tuple[Any, ...], ...],
    check_allocation: bool,
    allocation: Any,
    allocation_bucket: Callable[[str], int],
    split_bucket: Callable[[str], int],
    treatment_of: Callable[[Any, str, str, Context, int], Any],
) -> tuple[Core, LabelledCore]:
    """(matching key, bucketing key, context, depth) → outcome, and → (outcome, label) for explain.

    ``before``/``after``: (test, fixed outcome, bucket table, label) for the conditions before and
    from the first ROLLOUT one; an outcome of None (a null treatment) means the default treatment.
    Both functions may raise where the SDK raises.
    """
    if killed:
        killed_result = (default, LABEL_KILLED)
        return (lambda mk, bk, ctx, depth: default), (lambda mk, bk, ctx, depth: killed_result)
    default_is_control = default is CONTROL_SERVED

    def labelled(mk: str, bk: str, ctx: Context, depth: int) -> tuple[Served, Any]:
        for name, treatments in prerequisites:
            if treatment_of(name, mk, bk, ctx, depth) not in treatments:
                if not default_is_control:
                    return default, LABEL_PREREQUISITES_NOT_MET
                break  # the SDK still runs the conditions while the treatment is "control"
        for index, conditions in enumerate((before, after)):
            if index and check_allocation and allocation_bucket(bk) > allocation:
                return default, LABEL_NOT_IN_SPLIT
            for test, fixed, table, label in conditions:
                if test is True or test(mk, bk, ctx, depth):
                    served = fixed if table is None else table[split_bucket(bk)]
                    return (default, LABEL_NO_CONDITION_MATCHED) if served is None else (served, label)
        return default, LABEL_NO_CONDITION_MATCHED

    # The hot path: no labels, no tuples, and the common shapes specialised.
    first = tuple(c[:3] for c in before)
    rest = tuple(c[:3] for c in after)
    if not prerequisites and not first and not check_allocation:
        if not rest:
            return (lambda mk, bk, ctx, depth: default), labelled
        if len(rest) == 1 and rest[0][0] is True:
            fixed, table = rest[0][1], rest[0][2]
            if table is None:
                only = default if fixed is None else fixed
                return (lambda mk, bk, ctx, depth: only), labelled
            return (lambda mk, bk, ctx, depth: table[split_bucket(bk)] or default), labelled

    def core(mk: str, bk: str, ctx: Context, depth: int) -> Served:
        if prerequisites:
            for name, treatments in prerequisites:
                if treatment_of(name, mk, bk, ctx, depth) not in treatments:
                    if not default_is_control:
                        return default
                    break
        for test, fixed, table in first:
            if test is True or test(mk, bk, ctx, depth):
                return (fixed if table is None else table[split_bucket(bk)]) or default
        if check_allocation and allocation_bucket(bk) > allocation:
            return default
        for test, fixed, table in rest:
            if test is True or test(mk, bk, ctx, depth):
                return (fixed if table is None else table[split_bucket(bk)]) or default
        return default

    return core, labelled


def _valid_key(value: Any) -> str | None:
    """The SDK's key validation: non-blank string ≤ 250 characters, or a finite number as ``str``."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or not isinstance(value, numbers.Number):
        return None
    else:
        try:
            if math.isnan(value) or math.isinf(value):  # type: ignore[arg-type]
                return None
        except TypeError:
            return None
        text = str(value)
    if not text or text.isspace() or len(text) > MAX_KEY_LENGTH:
        return None
    return text


def _keys(ctx: Context) -> tuple[str, str] | None:
    """(matching key, bucketing key) as the SDK validates them, or None (→ control)."""
    mk = _valid_key(ctx.get("key"))
    if mk is None:
        return None
    bk = ctx.get("bucketingKey")
    if bk is None:
        return mk, mk
    bk = _valid_key(bk)
    return None if bk is None else (mk, bk)


def _entry_points(
    name: str, core: Core, labelled: LabelledCore, change_number: Any
) -> tuple[Callable[[Context], Served], Callable[[Context], tuple[Served, dict[str, Any]]]]:
    def evaluate(ctx: Context) -> Served:
        mk = ctx.get("key")
        bk = ctx.get("bucketingKey")
        if bk is None and type(mk) is str and 0 < len(mk) <= MAX_KEY_LENGTH and not mk.isspace():
            bk = mk
        else:
            pair = _keys(ctx)
            if pair is None:
                return CONTROL_SERVED
            mk, bk = pair
        try:
            return core(mk, bk, ctx, 0)
        except Exception as exc:
            _warn_once("evaluation error in flag", name, f"{type(exc).__name__}: {exc}; serving control")
            return CONTROL_SERVED

    def explain(ctx: Context) -> tuple[Served, dict[str, Any]]:
        pair = _keys(ctx)
        if pair is None:
            return CONTROL_SERVED, {"reason": REASON_INVALID_KEY}
        mk, bk = pair
        why: dict[str, Any] = {"changeNumber": change_number} if change_number is not None else {}
        try:
            served, label = labelled(mk, bk, ctx, 0)
        except Exception as exc:
            return CONTROL_SERVED, {"reason": LABEL_EXCEPTION, "error": f"{type(exc).__name__}: {exc}", **why}
        return served, {"reason": label, **why}

    return evaluate, explain


_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, re.error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args and isinstance(exc.args[0], str) else str(exc)
    return str(exc) or type(exc).__name__


def compile_split(
    flags_by_name: Mapping[str, Any],
    segments: Mapping[str, Iterable[Any]] | None = None,
    rb_segments: Mapping[str, Any] | None = None,
    problems: dict[str, str] | None = None,
) -> dict[str, Flag]:
    """Raw splits (by name), segment members and raw rule-based segments → engine flags.

    Non-ACTIVE items are dropped. A definition that cannot be compiled is left out and reported in
    ``problems`` (logged when no dict is given); flags that depend on it then see it as missing.
    """
    report: dict[str, str] = {} if problems is None else problems
    compiler = _Compiler(segments or {}, report)
    for name, raw in (rb_segments or {}).items():
        if not isinstance(raw, dict):
            report[f"rbsegments:{name}"] = "expected a JSON object"
            continue
        if not _active(raw):
            continue
        try:
            compiler.rbs[name] = compiler.rule_based_segment(name, raw)
        except _PARSE_ERRORS as exc:
            report[f"rbsegments:{name}"] = _describe(exc)
    flags: dict[str, Flag] = {}
    for name, raw in flags_by_name.items():
        if not isinstance(raw, dict):
            report[name] = "expected a JSON object"
            continue
        if not _active(raw):
            continue
        try:
            core, labelled, served, default = compiler.flag(name, raw)
        except _PARSE_ERRORS as exc:
            report[name] = _describe(exc)
            continue
        compiler.cores[name] = core
        evaluate, explain = _entry_points(name, core, labelled, raw.get("changeNumber"))
        flags[name] = Flag(
            key=name,
            key_json=encode_json(name),
            evaluate=evaluate,
            explain=explain,
            served=served,
            default=default,
            definition=raw,
            source="split",
        )
    if problems is None:
        for name, message in report.items():
            log.error("split definition %r is not served: %s", name, message)
    return flags


# --- entry points: the CLI (files) and the store (stored texts) ------------------------------------


def load_file(path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
    """A splitChanges JSON file (+ segmentChanges files ``<dir>/<name>.json``) → flags.

    Raises FlagError on a malformed file or definition (the SDK would reject the whole payload).
    """
    try:
        document = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FlagError(str(path), f"invalid JSON: {exc}") from None
    flags_raw, rbs_raw = parse_split_changes(document)
    segments: dict[str, frozenset[Any]] = {}
    if segments_dir is not None:
        segments = load_segments(segments_dir, referenced_segments(flags_raw, rbs_raw))
    problems: dict[str, str] = {}
    flags = compile_split(flags_raw, segments, rbs_raw, problems)
    if problems:
        name, message = next(iter(problems.items()))
        raise FlagError(name, message)
    return flags


def _fingerprint(kinds: Mapping[str, Mapping[str, str]]) -> str:
    digest = hashlib.sha256()
    for kind in sorted(kinds):
        for name, text in sorted(kinds[kind].items()):
            for part in (kind, name, text):
                data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else bytes(part)
                digest.update(len(data).to_bytes(8, "little"))
                digest.update(data)
    return digest.hexdigest()


def compile_items(
    kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
) -> tuple[dict[str, Flag], dict[str, str]]:
    """Stored Split items (see the module docstring) → (flags, problems); recompiled only on change."""
    fingerprint = _fingerprint(kinds)
    if cache.get("fingerprint") == fingerprint:
        return dict(cache["flags"]), dict(cache["problems"])
    problems: dict[str, str] = {}

    def parsed(kind: str) -> dict[str, Any]:
        out = {}
        for name, text in kinds.get(kind, {}).items():
            try:
                out[name] = json.loads(text)
            except (ValueError, UnicodeDecodeError) as exc:
                problems[name if kind == "flags" else f"{kind}:{name}"] = f"invalid JSON: {exc}"
        return out

    segments: dict[str, frozenset[Any]] = {}
    for name, document in parsed("segments").items():
        try:
            segments[name] = segment_members(document, name)
        except FlagError as exc:
            problems[f"segments:{name}"] = exc.message
    flags = compile_split(parsed("flags"), segments, parsed("rbsegments"), problems)
    cache.clear()
    cache.update(fingerprint=fingerprint, flags=flags, problems=dict(problems))
    return dict(flags), problems
