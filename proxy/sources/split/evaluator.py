"""Compiling Split definitions into engine flags, and the evaluation they serve.

``compile_split`` turns raw flags, segment members and raw rule-based segments into engine ``Flag``
objects: the flag compiler builds conditions (matchers from ``matchers``), rule-based segments, the
prerequisite / traffic-allocation / condition order of the SDK's ``Evaluator`` and a 100-entry bucket
table per partition set (``_make_core``), and ``_entry_points`` adds the SDK's key validation and its
``control`` on anything that raises. ``load_file`` (CLI) and ``compile_items`` (stored texts,
recompiled only when they change: ``proxy.sources.stored``) are the two ways in.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from proxy.engine import Flag, FlagError, Served, encode_json
from proxy.sources.split.documents import (
    _active,
    load_segments,
    parse_split_changes,
    referenced_segments,
    segment_members,
)
from proxy.sources.split.hashing import _bucketer, is_murmur
from proxy.sources.split.matchers import (
    _EMPTY,
    Context,
    Test,
    _all_of,
    _MatcherCompiler,
    _members,
    _Unsupported,
)
from proxy.sources.stored import compile_on_change, parsed

log = logging.getLogger("proxy.sources.split")  # one logger for the package, as when it was one module

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

CONTROL_SERVED = Served.make(CONTROL)


class _TooDeep(RuntimeError):
    """Nested evaluations went deeper than MAX_DEPTH: a dependency cycle."""


class _Missing(LookupError):
    """A rule-based segment that is not stored (the SDK fails on ``None.excluded``)."""


_warned: set[tuple[str, str]] = set()


def _warn_once(kind: str, name: str, message: str) -> None:
    if (kind, name) not in _warned:
        _warned.add((kind, name))
        log.warning("split %s %r: %s", kind, name, message)


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
        self.matcher = _MatcherCompiler(self.segments, self.treatment_of, self.in_rule_based_segment).matcher

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


def standard_reason(why: Mapping[str, Any]) -> str:
    """An explanation's Split label as one of OpenFeature's standard reasons (the client flags API)."""
    label = why.get("reason")
    if label == LABEL_KILLED:
        return "DISABLED"
    if label in (LABEL_NO_CONDITION_MATCHED, LABEL_NOT_IN_SPLIT, LABEL_PREREQUISITES_NOT_MET):
        return "DEFAULT"
    if label in (LABEL_EXCEPTION, LABEL_NOT_FOUND, LABEL_UNSUPPORTED, REASON_INVALID_KEY):
        return "ERROR"
    return "TARGETING_MATCH"  # a condition's own label ("in segment beta", "whitelisted", ...)


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


_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)  # PatternError too


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
            reason_of=standard_reason,
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
        segments = load_segments(segments_dir, referenced_segments([*flags_raw.values(), *rbs_raw.values()]))
    problems: dict[str, str] = {}
    flags = compile_split(flags_raw, segments, rbs_raw, problems)
    if problems:
        name, message = next(iter(problems.items()))
        raise FlagError(name, message)
    return flags


def compile_items(
    kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
) -> tuple[dict[str, Flag], dict[str, str]]:
    """Stored Split items (see the module docstring) → (flags, problems); recompiled only on change."""

    def build(problems: dict[str, str]) -> dict[str, Flag]:
        segments: dict[str, frozenset[Any]] = {}
        for name, document in parsed(kinds, "segments", problems).items():
            try:
                segments[name] = segment_members(document, name)
            except FlagError as exc:
                problems[f"segments:{name}"] = exc.message
        flags = parsed(kinds, "flags", problems)
        return compile_split(flags, segments, parsed(kinds, "rbsegments", problems), problems)

    return compile_on_change(kinds, cache, build)
