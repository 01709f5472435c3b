"""JsonLogic targeting conditions, compiled once into Python closures.

``compile_logic(expr)`` validates the expression (unknown operators, wrong arity, bad regexes and
semver literals are errors at load) and returns ``f(context) -> value``; evaluating never raises on
odd data: a type mismatch is simply false, never an exception on the request path.

Operators: ``== != === !== < <= > >=`` (``<`` and ``<=`` also take three arguments: between),
``in`` (list membership, substring), ``and or ! !! if``, ``var`` (dotted paths, defaults),
``missing``, ``missing_some``, and the targeting extras ``starts_with``, ``ends_with``,
``sem_ver`` and ``regex`` (RE2, linear time: see ``proxy.engine.patterns``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, TypeGuard

from proxy.engine.patterns import Pattern, PatternError
from proxy.engine.semver import SEMVER_OPS, compare_keys, version_key

Logic = Callable[[Mapping[str, Any]], Any]
MAX_DEPTH = 64


class LogicError(ValueError):
    """A condition is malformed; ``path`` points into the expression."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


_MISSING = object()


def truthy(value: Any) -> bool:
    """JsonLogic truthiness: empty arrays are false, ``"0"`` is true, like JavaScript."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return bool(value)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_number(value: Any) -> float | None:
    if _is_number(value):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else None
        except ValueError:
            return None
    if isinstance(value, bool):
        return 1 if value else 0
    return None


def loose_equals(a: Any, b: Any) -> bool:
    """``==``: numbers and numeric strings compare as numbers, booleans compare by truth."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, bool) and isinstance(b, bool):
            return a is b
        na, nb = _to_number(a), _to_number(b)
        return na is not None and na == nb
    if _is_number(a) or _is_number(b):
        na, nb = _to_number(a), _to_number(b)
        return na is not None and nb is not None and na == nb
    return type(a) is type(b) and a == b


def strict_equals(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _ordered(a: Any, b: Any) -> tuple[Any, Any] | None:
    """Coerce a pair for ordering comparisons; None when they are not comparable."""
    if isinstance(a, str) and isinstance(b, str):
        return a, b
    na, nb = _to_number(a), _to_number(b)
    if na is None or nb is None or a is None or b is None:
        return None
    return na, nb


def _less(a: Any, b: Any, or_equal: bool) -> bool:
    pair = _ordered(a, b)
    if pair is None:
        return False
    # str/str or float/float (see _ordered): the comparison is a bool; bool() states it for the checker.
    return bool(pair[0] <= pair[1] if or_equal else pair[0] < pair[1])


def resolve_var(context: Mapping[str, Any], path: Any, default: Any = None) -> Any:
    if path is None or path == "" or path == []:
        return context
    if isinstance(path, (int, float)) and not isinstance(path, bool):
        path = str(int(path)) if float(path).is_integer() else str(path)
    if not isinstance(path, str):
        return default
    current: Any = context
    for part in path.split("."):
        if isinstance(current, Mapping):
            current = current.get(part, _MISSING)
        elif isinstance(current, (list, tuple)) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return default
        if current is _MISSING:
            return default
    return default if current is None else current


MAX_RUNTIME_PATTERN_CHARS = 1024
"""A pattern computed at evaluation time (``{"regex": [x, {"var": ...}]}``) comes from the request:
longer ones, and ones RE2 refuses, match nothing."""
RUNTIME_PATTERN_MEMORY = 256 << 10  # RE2's budget per runtime pattern: 64 cached ≤ 16 MiB


@lru_cache(maxsize=64)
def _runtime_regex(pattern: str) -> Pattern | None:
    if len(pattern) > MAX_RUNTIME_PATTERN_CHARS:
        return None
    try:
        return Pattern(pattern, max_mem=RUNTIME_PATTERN_MEMORY)
    except PatternError:
        return None


# --- the compiler ---------------------------------------------------------------------------------


def compile_logic(expr: Any, path: str = "if") -> Logic:
    """Compile a JsonLogic expression; raise LogicError naming the offending spot."""
    return _compile(expr, path, 0)


def _const(value: Any) -> Logic:
    return lambda ctx: value


def _compile(expr: Any, path: str, depth: int) -> Logic:
    if depth > MAX_DEPTH:
        raise LogicError(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(expr, list):
        items = [_compile(e, f"{path}[{i}]", depth + 1) for i, e in enumerate(expr)]
        if all(getattr(f, "constant", False) for f in items):
            value = [f({}) for f in items]
            return _constant(value)
        return lambda ctx: [f(ctx) for f in items]
    if not isinstance(expr, dict):
        if isinstance(expr, float) and expr != expr:  # NaN cannot come from JSON; refuse it anyway
            raise LogicError(path, "NaN is not a JSON value")
        return _constant(expr)
    if len(expr) != 1:
        raise LogicError(path, f"an operation is an object with exactly one operator, got {len(expr)} keys")
    op, raw_args = next(iter(expr.items()))
    builder = _OPERATORS.get(op)
    if builder is None:
        raise LogicError(f"{path}.{op}", "unknown operator")
    args = raw_args if isinstance(raw_args, list) else [raw_args]
    where = f"{path}.{op}"
    return builder(args, where, depth + 1)


def _constant(value: Any) -> Logic:
    def f(ctx: Mapping[str, Any]) -> Any:
        return value

    # Marks read back by _is_const: functions accept any attribute, but mypy knows only declared ones.
    f.constant = True  # type: ignore[attr-defined]
    f.value = value  # type: ignore[attr-defined]
    return f


def _args(args: list[Any], where: str, depth: int, lo: int, hi: int) -> list[Logic]:
    if not lo <= len(args) <= hi:
        expected = str(lo) if lo == hi else f"{lo} to {hi}"
        raise LogicError(where, f"expects {expected} arguments, got {len(args)}")
    return [_compile(a, f"{where}[{i}]", depth) for i, a in enumerate(args)]


def _is_const(f: Logic) -> bool:
    return getattr(f, "constant", False)


def _op_var(args: list[Any], where: str, depth: int) -> Logic:
    if len(args) > 2:
        raise LogicError(where, f"expects a path and an optional default, got {len(args)} arguments")
    path_f = _compile(args[0], f"{where}[0]", depth) if args else _constant(None)
    default_f = _compile(args[1], f"{where}[1]", depth) if len(args) > 1 else _constant(None)
    if _is_const(path_f) and _is_const(default_f):
        key, default = path_f({}), default_f({})
        if isinstance(key, str) and key and "." not in key:

            def simple(ctx: Mapping[str, Any]) -> Any:
                value = ctx.get(key)
                return default if value is None else value

            return simple
        return lambda ctx: resolve_var(ctx, key, default)
    return lambda ctx: resolve_var(ctx, path_f(ctx), default_f(ctx))


def _op_missing(args: list[Any], where: str, depth: int) -> Logic:
    items = [_compile(a, f"{where}[{i}]", depth) for i, a in enumerate(args)]

    def f(ctx: Mapping[str, Any]) -> list[Any]:
        keys: list[Any] = []
        for item in items:
            value = item(ctx)
            keys.extend(value if isinstance(value, list) else [value])
        return [k for k in keys if resolve_var(ctx, k, _MISSING) in (_MISSING, "")]

    return f


def _op_missing_some(args: list[Any], where: str, depth: int) -> Logic:
    need_f, keys_f = _args(args, where, depth, 2, 2)

    def f(ctx: Mapping[str, Any]) -> list[Any]:
        need, keys = need_f(ctx), keys_f(ctx)
        if not isinstance(keys, list) or not _is_number(need):
            return []
        missing = [k for k in keys if resolve_var(ctx, k, _MISSING) in (_MISSING, "")]
        return [] if len(keys) - len(missing) >= need else missing

    return f


def _binary(
    compare: Callable[[Any, Any], bool], negate: bool = False
) -> Callable[[list[Any], str, int], Logic]:
    def build(args: list[Any], where: str, depth: int) -> Logic:
        a, b = _args(args, where, depth, 2, 2)
        if _is_const(a) and not _is_const(b):
            a, b = b, a  # both equalities are symmetric: keep the constant on the right
        if _is_const(b):
            bv = b({})
            if isinstance(bv, str):
                # Fast path for the common `{"==": [{"var": "country"}, "NZ"]}`: str vs str is plain equality.
                if negate:
                    return lambda ctx: (v != bv) if type(v := a(ctx)) is str else not compare(v, bv)
                return lambda ctx: (v == bv) if type(v := a(ctx)) is str else compare(v, bv)
            if negate:
                return lambda ctx: not compare(a(ctx), bv)
            return lambda ctx: compare(a(ctx), bv)
        if negate:
            return lambda ctx: not compare(a(ctx), b(ctx))
        return lambda ctx: compare(a(ctx), b(ctx))

    return build


def _ordering(a: Logic, b: Logic, op: Callable[[Any, Any], bool]) -> Logic:
    """``a op b`` with JsonLogic coercion; a plain comparison when a number meets a numeric constant."""
    if _is_const(b) and _is_number(bv := b({})):

        def against_constant(ctx: Mapping[str, Any]) -> bool:
            v = a(ctx)
            if type(v) is int or type(v) is float:
                return op(v, bv)
            if type(v) is str:  # the common `{"<": [{"var": "key"}, 1000]}`: as _to_number does
                try:
                    return op(float(v.strip()), bv)
                except ValueError:
                    return False
            pair = _ordered(v, bv)
            return pair is not None and op(pair[0], pair[1])

        return against_constant

    def general(ctx: Mapping[str, Any]) -> bool:
        pair = _ordered(a(ctx), b(ctx))
        return pair is not None and op(pair[0], pair[1])

    return general


def _comparison(or_equal: bool, greater: bool = False) -> Callable[[list[Any], str, int], Logic]:
    op = (operator.ge if or_equal else operator.gt) if greater else (operator.le if or_equal else operator.lt)

    def build(args: list[Any], where: str, depth: int) -> Logic:
        fs = _args(args, where, depth, 2, 2 if greater else 3)
        if len(fs) == 3:  # between: {"<": [low, x, high]}
            a, b, c = fs
            return lambda ctx: _less(a(ctx), (bv := b(ctx)), or_equal) and _less(bv, c(ctx), or_equal)
        return _ordering(fs[0], fs[1], op)

    return build


def _contains(needle: Any, haystack: Any) -> bool:
    if isinstance(haystack, list):
        return any(strict_equals(needle, item) for item in haystack)
    if isinstance(haystack, str) and isinstance(needle, str):
        return needle in haystack
    return False


def _op_in(args: list[Any], where: str, depth: int) -> Logic:
    a, b = _args(args, where, depth, 2, 2)
    if _is_const(b) and isinstance(b({}), list):
        items = b({})
        if all(isinstance(i, str) for i in items):
            members = frozenset(items)
            return lambda ctx: isinstance(v := a(ctx), str) and v in members
    return lambda ctx: _contains(a(ctx), b(ctx))


def _op_and(args: list[Any], where: str, depth: int) -> Logic:
    fs = _args(args, where, depth, 1, 10_000)
    if len(fs) == 2:
        first, second = fs
        return lambda ctx: second(ctx) if (v := first(ctx)) is True or (v is not False and truthy(v)) else v

    def f(ctx: Mapping[str, Any]) -> Any:
        value: Any = None
        for g in fs:
            value = g(ctx)
            if not truthy(value):
                return value
        return value

    return f


def _op_or(args: list[Any], where: str, depth: int) -> Logic:
    fs = _args(args, where, depth, 1, 10_000)

    def f(ctx: Mapping[str, Any]) -> Any:
        value: Any = None
        for g in fs:
            value = g(ctx)
            if truthy(value):
                return value
        return value

    return f


def _op_not(args: list[Any], where: str, depth: int) -> Logic:
    (a,) = _args(args, where, depth, 1, 1)
    return lambda ctx: not truthy(a(ctx))


def _op_notnot(args: list[Any], where: str, depth: int) -> Logic:
    (a,) = _args(args, where, depth, 1, 1)
    return lambda ctx: truthy(a(ctx))


def _op_if(args: list[Any], where: str, depth: int) -> Logic:
    fs = _args(args, where, depth, 0, 10_000)

    def f(ctx: Mapping[str, Any]) -> Any:
        i = 0
        while i + 1 < len(fs):
            if truthy(fs[i](ctx)):
                return fs[i + 1](ctx)
            i += 2
        return fs[i](ctx) if i < len(fs) else None

    return f


def _op_starts_with(args: list[Any], where: str, depth: int) -> Logic:
    a, b = _args(args, where, depth, 2, 2)
    return lambda ctx: isinstance(v := a(ctx), str) and isinstance(p := b(ctx), str) and v.startswith(p)


def _op_ends_with(args: list[Any], where: str, depth: int) -> Logic:
    a, b = _args(args, where, depth, 2, 2)
    return lambda ctx: isinstance(v := a(ctx), str) and isinstance(p := b(ctx), str) and v.endswith(p)


def _op_regex(args: list[Any], where: str, depth: int) -> Logic:
    a, b = _args(args, where, depth, 2, 2)
    if _is_const(b):
        pattern = b({})
        if not isinstance(pattern, str):
            raise LogicError(f"{where}[1]", "the pattern must be a string")
        try:
            search = Pattern(pattern).search
        except PatternError as exc:
            raise LogicError(f"{where}[1]", f"invalid regular expression: {exc}") from None
        return lambda ctx: isinstance(v := a(ctx), str) and search(v)

    def dynamic(ctx: Mapping[str, Any]) -> bool:
        v, p = a(ctx), b(ctx)
        rx = _runtime_regex(p) if isinstance(p, str) else None
        return isinstance(v, str) and rx is not None and rx.search(v)

    return dynamic


def _op_sem_ver(args: list[Any], where: str, depth: int) -> Logic:
    a, op_f, b = _args(args, where, depth, 3, 3)
    if not _is_const(op_f) or op_f({}) not in SEMVER_OPS:
        raise LogicError(f"{where}[1]", f"the operator must be one of {', '.join(sorted(SEMVER_OPS))}")
    op = op_f({})
    if _is_const(b):
        target = version_key(b({}))
        if target is None:
            raise LogicError(f"{where}[2]", f"{b({})!r} is not a semantic version")
        return lambda ctx: (v := version_key(a(ctx))) is not None and compare_keys(v, op, target)

    def dynamic(ctx: Mapping[str, Any]) -> bool:
        v, t = version_key(a(ctx)), version_key(b(ctx))
        return v is not None and t is not None and compare_keys(v, op, t)

    return dynamic


_OPERATORS: dict[str, Callable[[list[Any], str, int], Logic]] = {
    "var": _op_var,
    "missing": _op_missing,
    "missing_some": _op_missing_some,
    "==": _binary(loose_equals),
    "!=": _binary(loose_equals, negate=True),
    "===": _binary(strict_equals),
    "!==": _binary(strict_equals, negate=True),
    "<": _comparison(or_equal=False),
    "<=": _comparison(or_equal=True),
    ">": _comparison(or_equal=False, greater=True),
    ">=": _comparison(or_equal=True, greater=True),
    "in": _op_in,
    "and": _op_and,
    "or": _op_or,
    "!": _op_not,
    "!!": _op_notnot,
    "if": _op_if,
    "?:": _op_if,
    "starts_with": _op_starts_with,
    "ends_with": _op_ends_with,
    "sem_ver": _op_sem_ver,
    "regex": _op_regex,
}

OPERATORS = frozenset(_OPERATORS)
