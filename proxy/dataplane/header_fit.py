"""The flag headers forwarded to the origin, fitted into the request-header budget.

``X-Feature-Flags`` is a compact JSON object ``{flagKey: value}``; ``X-Feature-Flags-Config``
``{flagKey: config}`` for served variants with a config (omitted when empty). Both are ASCII-only.

When the whole request head would exceed the budget, entries are dropped deterministically —
configs before values, lowest ``priority`` first, ties by key — and
``X-Feature-Flags-Omitted: <n>`` tells the origin how many flags did not arrive whole: flags whose
value was left out, plus flags whose value arrived without its config. Each header stays valid JSON.
Sizes are wire bytes: ``name: value\\r\\n`` per header line.

Flags marked ``required`` are never trimmed: their entries come first in both objects (in key
order), the rest are fitted into what is left, and a request whose budget cannot hold the required
entries is refused (``RequiredFlagsDoNotFit``, answered 431). When flags were left out and room
allows, ``X-Feature-Flags-Omitted-Keys`` lists them as a JSON array (``omitted_keys_header``).

``fit_plan`` gives the same headers as evaluating every flag and then ``fit``: it evaluates in keep
order (``TrimPlan``) and stops as soon as the values alone cannot fit, so a path with thousands of
flags costs what the few hundred that fit cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.asgi import Header
from proxy.engine import Flag, Served
from proxy.engine.flag import Fragments, encode_json
from proxy.engine.plan import TrimPlan
from proxy.origin import DEFAULT_NAMES, FlagHeaderNames

Resolved = Sequence[tuple[Flag, Served]]


def line_size(name: bytes | str, value_len: int) -> int:
    """Bytes of one header line on the wire: ``name: value\\r\\n``."""
    return len(name) + 2 + value_len + 2


def _members(obj: bytes | None) -> bytes:
    """``,m1,m2`` from ``{m1,m2}``; empty for None or ``{}``."""
    return b"," + obj[1:-1] if obj is not None and len(obj) > 2 else b""


def _object_size(entry_sizes: int, count: int) -> int:
    """Bytes of ``{e1,e2,...}`` given the summed entry sizes."""
    return 2 + entry_sizes + max(0, count - 1)


class RequiredFlagsDoNotFit(Exception):
    """The required flags' entries (and, when other flags apply, the ``-Omitted`` count line) need
    more room than the request head leaves."""

    def __init__(self, keys: list[str], needed: int, available: int) -> None:
        shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        super().__init__(
            f"the required flags ({shown}) need {needed} bytes of flag headers; this request leaves "
            f"{max(available, 0)} within the header budget"
        )
        self.keys, self.needed, self.available = keys, needed, available


@dataclass
class Fitted:
    """The flag headers for one request, and what had to be left out."""

    headers: list[Header]
    size: int  # wire bytes of ``headers``
    _omitted_values: list[str] = field(default_factory=list)
    omitted_configs: list[str] = field(default_factory=list)
    over_budget: bool = False  # the request does not fit even without flag headers
    # fit_plan: the flags never evaluated, as plan.keep[cut:] (kept by reference, listed on demand)
    _plan: TrimPlan | None = None
    _cut: int = 0

    @property
    def omitted_values(self) -> list[str]:
        """Keys of the flags whose value was left out."""
        if self._plan is None:
            return self._omitted_values
        return [*self._omitted_values, *(f.key for f in self._plan.keep[self._cut :])]

    @property
    def omitted(self) -> int:
        """Flags that did not arrive whole (value left out, or value without its config)."""
        left_out = len(self._omitted_values)
        if self._plan is not None:
            left_out += self._plan.count - self._cut
        return left_out + len(self.omitted_configs)


class FlagHeaders:
    """Encodes resolved flags into the flag headers, within a byte budget.

    Every name comes from one ``FlagHeaderNames`` (``[header] name``), and the whole family —
    ``<name>`` and ``<name>-*`` — is reserved: a client can never send any of them to the origin.
    The default family ``X-Feature-Flags*`` stays reserved under a custom name too, so an origin
    still reading the default names cannot be fed forged ones.
    """

    def __init__(self, name: str | FlagHeaderNames = DEFAULT_NAMES, config_name: str = "") -> None:
        self.names = FlagHeaderNames(name, config_name) if isinstance(name, str) else name
        wire = self.names
        self.name = wire.flags.lower().encode("latin-1")
        self.config_name = wire.config.lower().encode("latin-1")
        self.omitted_name = wire.omitted.lower().encode("latin-1")
        self.signature_name = wire.signature.lower().encode("latin-1")
        self.omitted_keys_name = wire.omitted_keys.lower().encode("latin-1")
        # what the origin reads: the names as configured (``X-Feature-Flags``), not lower case
        self.spelled = {
            self.name: wire.flags.encode("latin-1"),
            self.config_name: wire.config.encode("latin-1"),
            self.omitted_name: wire.omitted.encode("latin-1"),
            self.omitted_keys_name: wire.omitted_keys.encode("latin-1"),
        }
        families = {self.name, DEFAULT_NAMES.flags.lower().encode("latin-1")}
        self.reserved_exact = frozenset({*families, self.config_name})
        self.reserved_prefixes = tuple(family + b"-" for family in families)

    def is_reserved(self, name: bytes) -> bool:
        """``name`` must already be lower case (ASGI guarantees it)."""
        return name in self.reserved_exact or name.startswith(self.reserved_prefixes)

    def encode(self, resolved: Resolved) -> list[Header]:
        """Everything, no budget (the CLI and tests)."""
        return self.fit(resolved, None).headers

    def fit(self, resolved: Resolved, available: int | None) -> Fitted:
        """The flag headers whose wire size is at most ``available`` bytes (None: unlimited).

        Raises ``RequiredFlagsDoNotFit`` when the required flags' entries alone cannot fit."""
        if not any(flag.required for flag, _ in resolved):
            return self._fit(resolved, available)
        required = [(f, s) for f, s in resolved if f.required]
        rest = [(f, s) for f, s in resolved if not f.required]
        entries = [flag.entries.get(id(served)) or flag.entry(served) for flag, served in required]
        keys = [flag.key for flag, _ in required]
        return self._with_required(entries, keys, lambda room: self._fit(rest, room), available, len(rest))

    def _with_required(
        self,
        entries: list[Fragments],
        keys: list[str],
        rest_fit: Callable[[int | None], Fitted],
        available: int | None,
        rest_count: int,
    ) -> Fitted:
        """The required entries first, then what ``rest_fit`` fits into the room they leave."""
        value_members = sum(entry[2] for entry in entries)  # each with a comma
        config_members = sum(entry[3] for entry in entries)
        extra = value_members + (line_size(self.config_name, config_members + 1) if config_members else 0)
        needed = line_size(self.name, value_members + 1) + extra - value_members
        if rest_count:  # and room to say how many of the others were left out, should all of them be
            needed += line_size(self.omitted_name, len(str(rest_count)))
        if available is not None and needed > available:
            raise RequiredFlagsDoNotFit(keys, needed, available)
        rest = rest_fit(None if available is None else available - extra) if rest_count else Fitted([], 0)
        theirs = dict(rest.headers)
        values = ",".join(entry[0] for entry in entries).encode("ascii")
        configs = ",".join(entry[1] for entry in entries if entry[1] is not None).encode("ascii")
        headers: list[Header] = [(self.name, b"{" + values + _members(theirs.get(self.name)) + b"}")]
        their_configs = theirs.get(self.config_name)
        if configs:
            headers.append((self.config_name, b"{" + configs + _members(their_configs) + b"}"))
        elif their_configs is not None:
            headers.append((self.config_name, their_configs))
        if self.omitted_name in theirs:
            headers.append((self.omitted_name, theirs[self.omitted_name]))
        size = sum(line_size(n, len(v)) for n, v in headers)
        if available is not None and size > available:
            raise RequiredFlagsDoNotFit(keys, size, available)
        return Fitted(
            headers, size, rest._omitted_values, rest.omitted_configs, rest.over_budget, rest._plan, rest._cut
        )

    def omitted_keys_header(self, fitted: Fitted, room: int) -> Header | None:
        """``<name>-Omitted-Keys: ["key",...]`` for the flags that did not arrive whole, when the line
        fits in ``room`` bytes; None otherwise (the count alone stays)."""
        omitted = fitted.omitted
        if not omitted or room < line_size(self.omitted_keys_name, 2 + 4 * omitted - 1):
            return None  # each key takes at least '"k",': not even the shortest keys would fit
        keys = [*fitted.omitted_values, *fitted.omitted_configs]
        value = ("[" + ",".join(encode_json(key) for key in keys) + "]").encode("ascii")
        if line_size(self.omitted_keys_name, len(value)) > room:
            return None
        return self.omitted_keys_name, value

    def _fit(self, resolved: Resolved, available: int | None) -> Fitted:
        values: list[str] = []
        configs: list[tuple[int, str]] = []
        value_bytes = config_bytes = 0
        for i, (flag, served) in enumerate(resolved):
            value, config, _, _ = flag.entries.get(id(served)) or flag.entry(served)
            values.append(value)
            value_bytes += len(value)
            if config is not None:
                configs.append((i, config))
                config_bytes += len(config)
        size = line_size(self.name, _object_size(value_bytes, len(values)))
        if configs:
            size += line_size(self.config_name, _object_size(config_bytes, len(configs)))
        if available is None or size <= available:
            return Fitted(self._headers(values, [c for _, c in configs]), size)
        return self._trim(resolved, values, configs, available)

    def _headers(self, values: list[str], configs: list[str], omitted: int = 0) -> list[Header]:
        headers = [(self.name, ("{" + ",".join(values) + "}").encode("ascii"))]
        if configs:
            headers.append((self.config_name, ("{" + ",".join(configs) + "}").encode("ascii")))
        if omitted:
            headers.append((self.omitted_name, str(omitted).encode("ascii")))
        return headers

    def _trim(
        self, resolved: Resolved, values: list[str], configs: list[tuple[int, str]], available: int
    ) -> Fitted:
        """Drop entries in a fixed order until the headers fit."""
        total = len(values)  # the count never exceeds the number of flags
        omitted_line = line_size(self.omitted_name, len(str(total)))  # room for the count, at most
        order = sorted(range(len(resolved)), key=lambda i: (resolved[i][0].priority, resolved[i][0].key))
        keep_value = [True] * len(values)
        keep_config = dict(configs)
        value_sum, value_count = sum(map(len, values)), len(values)
        config_sum, config_count = sum(map(len, keep_config.values())), len(keep_config)

        def current() -> int:
            size = omitted_line + line_size(self.name, _object_size(value_sum, value_count))
            if config_count:
                size += line_size(self.config_name, _object_size(config_sum, config_count))
            return size

        for i in order:  # configs first
            if current() <= available:
                break
            if i in keep_config:
                config_sum -= len(keep_config.pop(i))
                config_count -= 1
        for i in order:  # then values
            if current() <= available:
                break
            keep_value[i] = False
            value_sum -= len(values[i])
            value_count -= 1

        keys = [flag.key for flag, _ in resolved]
        if current() > available:  # not even an empty object fits: no flag headers at all
            return self._over_budget(keys)
        # a config counts only when its flag's value was sent (a flag left out counts once)
        omitted_configs = [keys[i] for i, _ in configs if i not in keep_config and keep_value[i]]
        omitted_values = [keys[i] for i in range(len(values)) if not keep_value[i]]
        kept_values = [v for i, v in enumerate(values) if keep_value[i]]
        kept_configs = [c for i, c in configs if i in keep_config]
        omitted = len(omitted_values) + len(omitted_configs)
        headers = self._headers(kept_values, kept_configs, omitted)
        size = sum(line_size(n, len(v)) for n, v in headers)
        return Fitted(headers, size, omitted_values, omitted_configs)

    def _over_budget(self, keys: list[str], plan: TrimPlan | None = None) -> Fitted:
        total = plan.count if plan is not None else len(keys)
        headers = [(self.omitted_name, str(total).encode("ascii"))]
        size = line_size(self.omitted_name, len(str(total)))
        if plan is not None:
            return Fitted(headers, size, [], [], over_budget=True, _plan=plan, _cut=0)
        return Fitted(headers, size, keys, [], over_budget=True)

    def fit_plan(
        self, plan: TrimPlan, context: Mapping[str, Any], available: int
    ) -> tuple[Fitted, list[tuple[Flag, Served]]]:
        """Evaluate ``plan``'s flags for ``context`` and fit them into ``available`` bytes: the same
        headers as ``fit`` over every flag in key order, evaluating only the flags that can matter.
        Also returns what was evaluated (required flags, then keep order)."""
        if not plan.required:
            return self._fit_plan(plan, context, available)
        evaluated: list[tuple[Flag, Served]] = []
        entries: list[Fragments] = []
        for flag, evaluate, encoded in plan.required:
            served = evaluate(context)
            evaluated.append((flag, served))
            entries.append(encoded(id(served)) or flag.entry(served))
        rest: list[list[tuple[Flag, Served]]] = []

        def rest_fit(room: int | None) -> Fitted:
            fitted, more = self._fit_plan(plan, context, available if room is None else room)
            rest.append(more)
            return fitted

        keys = [flag.key for flag, _ in evaluated]
        fitted = self._with_required(entries, keys, rest_fit, available, plan.count)
        return fitted, evaluated + (rest[0] if rest else [])

    def _fit_plan(
        self, plan: TrimPlan, context: Mapping[str, Any], available: int
    ) -> tuple[Fitted, list[tuple[Flag, Served]]]:
        count = plan.count
        name_room = available - line_size(self.name, 2)  # the value object's members and commas
        reserve = line_size(self.omitted_name, len(str(count)))
        evaluated: list[tuple[Flag, Served]] = []
        entries: list[Fragments] = []
        keep_result, keep_entry = evaluated.append, entries.append
        members = -1  # bytes of the values' members plus commas
        config_members = 0  # bytes of the configs plus one comma each (0: no config)
        fit_until = -1  # the longest keep-order prefix whose values fit with the count line
        with_reserve = name_room - reserve
        for flag, evaluate, encoded in plan.calls:
            served = evaluate(context)
            keep_result((flag, served))
            entry = encoded(id(served)) or flag.entry(served)
            keep_entry(entry)
            members += entry[2]
            config_members += entry[3]
            if members > with_reserve:
                if fit_until < 0:  # keep[:i] fits with the count line; keep[:i+1] does not
                    fit_until = len(entries) - 1
                if members > name_room:  # even without the count line and configs: trimming for sure
                    return self._values_prefix(plan, entries, fit_until, available, reserve), evaluated
        # every value fits (with the count line): the budget bounds how many flags these are
        inverse = plan.inverse
        size = line_size(self.name, members + 2 if count else 2)
        if config_members:
            size += line_size(self.config_name, config_members + 1)
        if size <= available:  # everything fits: written in key order, nothing left out
            in_order = [entries[inverse[j]] for j in range(count)]
            values = [entry[0] for entry in in_order]
            configs = [config for _, config, _, _ in in_order if config is not None]
            return Fitted(self._headers(values, configs), size), evaluated
        if fit_until >= 0 or not count:  # the values fit only without the count line, which is needed
            kept = max(fit_until, 0)
            return self._values_prefix(plan, entries, kept, available, reserve), evaluated
        return self._configs_trim(plan, entries, members, config_members - 1, available, reserve), evaluated

    def _configs_trim(
        self,
        plan: TrimPlan,
        entries: list[Fragments],
        members: int,
        config_members: int,
        available: int,
        reserve: int,
    ) -> Fitted:
        """Phase one of the trim, in the plan's order (no sorting): every value stays, configs go
        lowest priority first until the headers fit with the count line."""
        keep, count, inverse = plan.keep, plan.count, plan.inverse
        fixed = reserve + line_size(self.name, members + 2)
        config_count = sum(1 for entry in entries if entry[1] is not None)
        dropped: set[int] = set()
        for i in range(count - 1, -1, -1):  # trim order: the reverse of keep order
            size = fixed + (line_size(self.config_name, config_members + 2) if config_count else 0)
            if size <= available:
                break
            config = entries[i][1]
            if config is not None:
                config_members -= len(config) + 1
                config_count -= 1
                dropped.add(i)
        in_order = [inverse[j] for j in range(count)]
        values = [entries[k][0] for k in in_order]
        configs = [c for k in in_order if (c := entries[k][1]) is not None and k not in dropped]
        omitted_configs = [keep[k].key for k in in_order if k in dropped]
        headers = self._headers(values, configs, len(dropped))
        size = sum(line_size(n, len(v)) for n, v in headers)
        return Fitted(headers, size, [], omitted_configs)

    def _values_prefix(
        self, plan: TrimPlan, entries: list[Fragments], kept: int, available: int, reserve: int
    ) -> Fitted:
        """Phase two of the trim: no configs, the first ``kept`` values in keep order."""
        if reserve + line_size(self.name, 2) > available and kept == 0:
            return self._over_budget([], plan)
        position = plan.position
        order = sorted(range(kept), key=position.__getitem__)
        values = [entries[i][0] for i in order]
        keys = plan.keep
        omitted_configs = [keys[i].key for i in order if entries[i][1] is not None]
        omitted = plan.count - kept + len(omitted_configs)
        headers = self._headers(values, [], omitted)
        size = sum(line_size(n, len(v)) for n, v in headers)
        return Fitted(headers, size, [], omitted_configs, _plan=plan, _cut=kept)
