"""The native format (docs/flags.md): documents, patches and stored items, compiled by the engine.

Strict at the door, lenient from the store. What a client sends (webhook, admin API) and the flags
file are validated whole: an unknown field is a typo until proven otherwise, answered 422, and
nothing is written. What is read back from the store was accepted by some release, perhaps a newer
one: fields this release does not know are ignored with a warning (forward compatibility), and an
item that still does not compile keeps its flag's last good definition (``SnapshotBuilder``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.engine import Flag, FlagError, compile_document, compile_flag
from proxy.engine.native import FLAG_FIELDS, RULE_FIELDS_BOOLEAN, RULE_FIELDS_VARIANTS, VARIANT_FIELDS
from proxy.store.change import Change, stored_text
from proxy.store.state import RawState

log = logging.getLogger("flagproxy.sources.native")
SOURCE = "native"


def parse_document(text: str | bytes, where: str = "document") -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlagError(where, f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise FlagError(where, "expected a JSON object with a 'flags' object")
    return document


def load_document(path: Path) -> dict[str, Any]:
    """A native flags file, validated whole (FlagError names the flag and field)."""
    document = parse_document(path.read_bytes(), str(path))
    compile_document(document)
    return document


def load_file(path: str | Path) -> dict[str, Flag]:
    return compile_document(parse_document(Path(path).read_bytes(), str(path)))


def seed_state(document: Mapping[str, Any]) -> RawState:
    """A validated document as the store's raw state (the flags file, before any write)."""
    flags = {key: stored_text(definition) for key, definition in document.get("flags", {}).items()}
    return RawState(version=1 if flags else 0, data={SOURCE: {"flags": flags}})


def initial_state(path: str | Path, required: bool) -> RawState:
    """The flags file as raw state; a missing optional file (the default seeds) means no flags."""
    if not Path(path).exists():
        if required:
            raise FileNotFoundError(f"flags file {path} not found")
        log.warning("no flags file at %s: starting with no flags", path)
        return RawState()
    return seed_state(load_document(Path(path)))


def compile_items(items: Mapping[str, str], cache: dict[str, Any]) -> tuple[dict[str, Flag], dict[str, str]]:
    """Stored native flags (key → JSON text) → flags; ``cache`` keeps (text, flag) per key."""
    flags: dict[str, Flag] = {}
    problems: dict[str, str] = {}
    for key, text in items.items():
        hit = cache.get(key)
        if hit is not None and hit[0] == text:
            flags[key] = hit[1]
            continue
        try:
            definition = json.loads(text)
        except (ValueError, RecursionError) as exc:
            problems[key] = f"invalid JSON: {exc}"
            continue
        try:
            flag = compile_stored(key, definition)
        except (ValueError, RecursionError) as exc:  # FlagError, above all
            problems[key] = str(exc)
            continue
        if hit is not None and reordered_only(json.loads(hit[0]), definition):
            log.warning(
                "flag %r: the same variants in a new order; keys are re-bucketed (variants take their "
                "ranges in declared order)",
                key,
            )
        cache[key] = (text, flag)
        flags[key] = flag
    for key in [k for k in cache if k not in items]:
        del cache[key]
    return flags, problems


def compile_stored(key: str, definition: Any) -> Flag:
    """A definition read from the store: fields this release does not know are ignored, with a
    warning (a newer release wrote them); anything else wrong still raises FlagError."""
    try:
        return compile_flag(key, definition)
    except FlagError as strict:
        known, unknown = without_unknown_fields(definition)
        if not unknown:
            raise
        try:
            flag = compile_flag(key, known)
        except FlagError:
            raise strict from None
    log.warning(
        "stored flag %r has fields this release does not know, ignored (written by a newer release?): %s",
        key,
        ", ".join(unknown),
    )
    return flag


RULE_FIELDS = RULE_FIELDS_BOOLEAN | RULE_FIELDS_VARIANTS


def without_unknown_fields(definition: Any) -> tuple[Any, list[str]]:
    """``definition`` without the fields no rule of this release knows (flag, variant and rule
    level), and their paths. A field that is merely misplaced (``variant`` in a boolean flag's rule)
    is known, so it is kept and still fails."""
    if not isinstance(definition, dict):
        return definition, []
    unknown = [name for name in definition if name not in FLAG_FIELDS]
    known = {name: value for name, value in definition.items() if name in FLAG_FIELDS}
    variants = known.get("variants")
    if isinstance(variants, dict):
        cleaned: dict[str, Any] = {}
        for name, spec in variants.items():
            if isinstance(spec, dict):
                unknown += [f"variants.{name}.{f}" for f in spec if f not in VARIANT_FIELDS]
                spec = {f: v for f, v in spec.items() if f in VARIANT_FIELDS}
            cleaned[name] = spec
        known["variants"] = cleaned
    rules = known.get("rules")
    if isinstance(rules, list):
        kept_rules: list[Any] = []
        for i, rule in enumerate(rules):
            if isinstance(rule, dict):
                unknown += [f"rules[{i}].{f}" for f in rule if f not in RULE_FIELDS]
                rule = {f: v for f, v in rule.items() if f in RULE_FIELDS}
            kept_rules.append(rule)
        known["rules"] = kept_rules
    return known, unknown


def _bucket_orders(definition: Any) -> list[list[str]]:
    """The object member orders bucketing depends on: the variants, then each rule's rollout."""
    if not isinstance(definition, dict):
        return []
    orders = [list(definition.get("variants") or {})]
    for rule in definition.get("rules") or []:
        if isinstance(rule, dict) and isinstance(rule.get("rollout"), dict):
            orders.append(list(rule["rollout"]))
    return orders


def reordered_only(old: Any, new: Any) -> bool:
    """Equal definitions but for the order of variants or rollouts: a change that only moves keys.

    (Dict equality ignores order, so this is what an upstream tool that sorts keys produces.)
    """
    return old == new and _bucket_orders(old) != _bucket_orders(new)


def validated_upsert(key: str, definition: Any, actor: str) -> Change:
    """One flag written whole (the admin API's PUT); FlagError names the field.

    Without an ``updatedAt`` it supersedes what is stored: it applies, versioned now (or as the
    stored flag, if that is newer), so no write signed before it can undo it.
    """
    compile_flag(key, definition)
    return Change(
        source=SOURCE,
        upsert={key: stored_text(definition)},
        item_versions=_item_versions({key: definition}, now_ms()),
        stamp=now_stamp(),
        supersede=True,
        actor=actor,
    )


def validated_delete(key: str, actor: str) -> Change:
    """The admin API's DELETE: applies whatever is stored, and leaves a tombstone at least as new."""
    return Change(source=SOURCE, delete=[key], stamp=now_stamp(), supersede=True, actor=actor)


PATCH_FIELDS = frozenset({"upsert", "delete", "version", "note"})
MAX_VERSION = 2**53 - 1
MAX_AHEAD_MS = 5 * 60 * 1000  # an updatedAt further in the future would outrank every fix until then


def now_ms() -> int:
    return int(time.time() * 1000)


def now_stamp() -> int:
    """Now as a change's stamp: whole seconds (in ms), as a signed webhook's ``t``, so that a webhook
    signed in the same second as an admin write is not taken for an older one."""
    return int(time.time()) * 1000


SHAPE = 'expected a flags document {"flags": ...} or a patch {"upsert": ..., "delete": [...]}'


def updated_at_ms(definition: Mapping[str, Any]) -> int | None:
    """A flag's own version for ordering: its ``updatedAt`` in epoch milliseconds."""
    stamp = definition.get("updatedAt")
    if not isinstance(stamp, str):
        return None
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if moment.tzinfo is None:  # no offset: UTC, so every instance orders the same way
        moment = moment.replace(tzinfo=UTC)
    return max(0, int(moment.timestamp() * 1000))


def _item_versions(flags: Mapping[str, Any], now: int) -> dict[str, int]:
    """Each flag's ``updatedAt`` in ms (compiled flags: the timestamps are valid); FlagError for
    one more than ``MAX_AHEAD_MS`` ahead of ``now``."""
    versions: dict[str, int] = {}
    for key, definition in flags.items():
        version = updated_at_ms(definition)
        if version is None:
            continue
        if version > now + MAX_AHEAD_MS:
            raise FlagError(
                f"flags.{key}.updatedAt",
                f"{definition['updatedAt']} is more than 5 minutes in the future: it would outrank every "
                "change until then",
            )
        versions[key] = version
    return versions


def _document_version(payload: Mapping[str, Any]) -> int | None:
    version = payload.get("version")
    if version is None:
        return None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise FlagError("version", "expected a non-negative integer")
    if version > MAX_VERSION:  # Redis compares versions in Lua, as doubles: exact only up to 2^53
        raise FlagError("version", f"must not exceed {MAX_VERSION} (2^53 - 1)")
    return version


def change_from_payload(payload: Any, actor: str, stamp: int | None = None) -> Change:
    """A webhook body — a whole document (replace) or ``{"upsert", "delete"}`` (patch) — validated.

    ``stamp`` (epoch ms, the signed time) versions every flag without an ``updatedAt`` and every
    delete (docs/flags.md, "Ordering"). Raises FlagError naming the field; nothing is applied then.
    """
    if not isinstance(payload, dict):
        raise FlagError("body", 'expected a flags document {"flags": ...} or a patch {"upsert", "delete"}')
    if "flags" in payload:
        compile_document(payload)
        flags = payload["flags"]
        return Change(
            source=SOURCE,
            upsert={key: stored_text(d) for key, d in flags.items()},
            replace=True,
            source_version=_document_version(payload),
            item_versions=_item_versions(flags, now_ms()),
            stamp=stamp,
            actor=actor,
        )
    unknown = sorted(set(payload) - PATCH_FIELDS)
    if unknown or not ({"upsert", "delete"} & set(payload)):
        field = unknown[0] if unknown else "body"
        raise FlagError(field, 'expected a flags document {"flags": ...} or a patch {"upsert", "delete"}')
    upsert = payload.get("upsert", {})
    if not isinstance(upsert, dict):
        raise FlagError("upsert", "expected an object of flag definitions")
    delete = payload.get("delete", [])
    if not isinstance(delete, list) or not all(isinstance(k, str) for k in delete):
        raise FlagError("delete", "expected a list of flag keys")
    both = sorted(set(upsert) & set(delete))
    if both:
        raise FlagError(f"delete.{both[0]}", "a flag cannot be upserted and deleted in one patch")
    for key, definition in upsert.items():
        compile_flag(key, definition)
    return Change(
        source=SOURCE,
        upsert={key: stored_text(d) for key, d in upsert.items()},
        delete=list(delete),
        source_version=_document_version(payload),
        item_versions=_item_versions(upsert, now_ms()),
        stamp=stamp,
        actor=actor,
    )
