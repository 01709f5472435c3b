"""A ``Command`` applied: the same store changes as the admin API, with the chat user as the actor.

Reads answer from the current snapshot; changes go through ``proxy.control.webhooks.apply`` (so
``/api/audit`` shows ``slack:<user id>`` or ``telegram:<user id>``) and are announced in the
configured channels. A refusal is a reply saying why, and nothing is written.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import logging
from dataclasses import dataclass
from typing import Any

from proxy.control.chat.commands import HELP, Command, reweighted
from proxy.control.deps import ControlDeps
from proxy.control.experiments import known_experiment
from proxy.control.flags import choices, describe, override_change, promotable
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import apply
from proxy.engine import FlagError, variant_name
from proxy.experiments.report import render_results
from proxy.experiments.results import results
from proxy.sources.native.document import SOURCE as NATIVE
from proxy.sources.native.document import validated_upsert
from proxy.store.change import Change
from proxy.store.state import ApplyResult

log = logging.getLogger("flagproxy.chat")

MAX_LIST = 50  # flags one /flag list shows


@dataclass(frozen=True)
class Actor:
    id: str  # the audit's actor: "slack:U012AB3CD", "telegram:42"
    name: str  # how announcements name them: "@alice"
    via: str  # "Slack", "Telegram"
    telegram_chat: int | None = None  # the Telegram chat the command came from (sees the reply already)
    # the request's id for the store ("telegram:<update_id>"): a change carrying it applies once across
    # every instance sharing the store (a Telegram retry that reached another instance), for delivery_ttl_s
    delivery: str = ""
    delivery_ttl_s: int = 0


@dataclass(frozen=True)
class Reply:
    text: str
    code: bool = False  # a table: shown monospaced


class Refused(Exception):
    """The command cannot be done; the message is the reply."""


async def run(deps: ControlDeps, command: Command, actor: Actor) -> Reply:
    """The command's reply; a change is announced once applied. Never raises."""
    try:
        if command.name == "help":
            return Reply(HELP, code=True)
        if command.name == "list":
            return Reply(list_text(deps, command.pattern), code=True)
        if command.name == "get":
            return Reply(get_text(deps, command.key), code=True)
        if command.name == "stats":
            return Reply(await stats_text(deps, command.key, command.goal), code=True)
        return await change(deps, command, actor)
    except Refused as exc:
        return Reply(str(exc))
    except HTTPProblem as exc:  # the store refused the write (unavailable, timeout): nothing applied
        return Reply(f"not done: {exc.detail}")
    except Exception:
        log.exception("chat: /flag %s failed", command.name)
        return Reply("not done: an internal error (the proxy's log has it)")


# --- reads ----------------------------------------------------------------------------------------


def _weights(definition: Any) -> list[tuple[str, int]] | None:
    variants = definition.get("variants") if isinstance(definition, dict) else None
    if not isinstance(variants, dict):
        return None
    return [(name, int(v.get("weight", 0)) if isinstance(v, dict) else 0) for name, v in variants.items()]


def _state(found: dict[str, Any]) -> str:
    """``on, control 50 / treatment_a 25 …, killed`` from a ``describe`` answer."""
    definition = found.get("definition")
    parts = []
    if found["source"] == NATIVE and isinstance(definition, dict):
        parts.append("on" if definition.get("enabled", True) else "off")
        weights = _weights(definition)
        if weights is not None:
            total = sum(w for _, w in weights) or 1
            parts.append(" / ".join(f"{name} {100 * w / total:.4g}%" for name, w in weights))
        elif "percentage" in definition:
            parts.append(f"true for {definition['percentage']}%")
    override = found.get("override")
    if isinstance(override, dict):
        promoted = override.get("promote")
        shown = variant_name(promoted) if isinstance(promoted, bool | str) else promoted
        parts.append("KILLED" if override.get("kill") else f"PROMOTED {shown}")
    if "invalid" in found:
        parts.append("INVALID stored definition (serving its last good one)")
    return ", ".join(parts)


def list_text(deps: ControlDeps, pattern: str) -> str:
    keys = sorted(deps.store.snapshot.flags)
    if pattern:
        globbing = any(c in pattern for c in "*?[")
        keys = [k for k in keys if (fnmatch.fnmatchcase(k, pattern) if globbing else pattern in k)]
    if not keys:
        return f"no flags match {pattern!r}" if pattern else "no flags"
    lines = []
    for key in keys[:MAX_LIST]:
        found = describe(deps, key)
        if found is not None:
            lines.append(f"{key} [{found['source']}] {_state(found)}".rstrip())
    if len(keys) > MAX_LIST:
        lines.append(f"… and {len(keys) - MAX_LIST} more (narrow it: /flag list PATTERN)")
    return "\n".join(lines)


def _known(deps: ControlDeps, key: str) -> dict[str, Any]:
    found = describe(deps, key) if key in deps.store.snapshot.flags else None
    if found is None:
        raise Refused(f"no flag {key!r} (/flag list shows them)")
    return found


def get_text(deps: ControlDeps, key: str) -> str:
    found = _known(deps, key)
    flag = deps.store.snapshot.flags[key]
    definition = found.get("definition")
    lines = [f"{key} [{found['source']}] {_state(found)}".rstrip()]
    lines.append("serves: " + choices(flag) + f"; default {variant_name(flag.default.value)}")
    if isinstance(definition, dict) and found["source"] == NATIVE:
        for field in ("rules", "routes"):
            if definition.get(field):
                lines.append(f"{field}: {len(definition[field])}")
        if "experiment" in definition:
            lines.append(f"experiment: {json.dumps(definition['experiment'], ensure_ascii=False)}")
    return "\n".join(lines)


async def stats_text(deps: ControlDeps, key: str, goal: str) -> str:
    if deps.recorder is None:
        raise Refused("experiments are disabled ([experiments] enabled = false)")
    try:
        _, counts = await known_experiment(deps, key)
    except HTTPProblem as exc:
        raise Refused(exc.detail) from None
    document = results(key, deps.store.snapshot.flags.get(key), counts)
    goals = document["goals"]
    if goal:
        if goal not in goals:
            raise Refused(f"{key} has no goal {goal!r}; its goals: {', '.join(goals) or 'none'}")
        goals = {goal: goals[goal]}
    return await asyncio.to_thread(render_results, document, goals)


# --- changes --------------------------------------------------------------------------------------


def _native(deps: ControlDeps, key: str) -> dict[str, Any]:
    found = _known(deps, key)
    if found["source"] != NATIVE:
        raise Refused(
            f"{key!r} comes from {found['source']}: change it there (kill, restore and promote work)"
        )
    definition = found.get("definition")
    if not isinstance(definition, dict):
        raise Refused(f"{key!r}: its stored definition cannot be read")
    return copy.deepcopy(definition)


def _upsert(key: str, definition: dict[str, Any], actor: Actor, action: str) -> Change:
    try:
        change = validated_upsert(key, definition, actor=actor.id)
    except FlagError as exc:
        raise Refused(f"not done: {exc}") from None
    change.action = action
    return change


def _planned(deps: ControlDeps, command: Command, actor: Actor) -> tuple[Change, str]:
    """The store change for ``command`` and what it does, in words; Refused when it cannot be done."""
    key = command.key
    if command.name in ("on", "off"):
        definition = _native(deps, key)
        definition["enabled"] = command.name == "on"
        return _upsert(key, definition, actor, command.name), f"turned {key} {command.name}"
    if command.name == "set":
        definition = _native(deps, key)
        weights = _weights(definition)
        if weights is None:  # a boolean flag: its percentage is the share that gets true
            if command.variant not in ("true", "false"):
                raise Refused(f"{key!r} is a boolean flag: /flag set {key} true|false PERCENT")
            share = command.percent if command.variant == "true" else 100 - command.percent
            definition["percentage"] = share
            return _upsert(key, definition, actor, "set_percentage"), f"set {key}: true for {share}%"
        try:
            new = reweighted(weights, command.variant, command.percent)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        for name, weight in new:
            definition["variants"][name]["weight"] = weight
        text = " / ".join(f"{name} {weight}" for name, weight in new)
        return _upsert(key, definition, actor, "set_weights"), f"set {key} weights: {text}"
    _known(deps, key)
    if command.name == "promote":
        flag = deps.store.snapshot.flags[key]
        variant = promotable(flag, command.variant)
        if variant is None:
            raise Refused(f"{key!r} has no variant {command.variant!r}; it serves {choices(flag)}")
        return override_change(key, "promote", actor.id, variant), f"promoted {key} to {command.variant}"
    verb = {"kill": "killed", "restore": "restored"}[command.name]
    return override_change(key, command.name, actor.id), f"{verb} {key}"


async def change(deps: ControlDeps, command: Command, actor: Actor) -> Reply:
    planned, done = _planned(deps, command, actor)
    planned.delivery, planned.delivery_ttl_s = actor.delivery, actor.delivery_ttl_s
    result: ApplyResult = await apply(deps.store, planned)
    if result.status == "duplicate":
        return Reply(f"already done: this request was applied before ({command.name} {command.key})")
    if result.status == "unchanged":
        return Reply(f"nothing to change: {command.key} is already like that")
    if result.status != "applied":
        return Reply(f"not done: the store answered {result.status}")
    if deps.chat is not None:
        deps.chat.announce(f"{actor.name} ({actor.via}) {done}", skip_telegram_chat=actor.telegram_chat)
    note = ""
    if command.name == "set" and deps.store.snapshot.flags[command.key].experiment is not None:
        note = (
            "\nnote: it is an experiment: its sample-ratio check now expects the new weights, so users "
            "exposed before this change count as a mismatch (/flag stats shows it)"
        )
    return Reply(f"done: {done} (store version {result.version}){note}")
