"""The store's ordering rules, in memory: ``apply_change`` and ``MemoryStore`` (no I/O at all).

The same rules run in Redis as a Lua script; ``test_store_redis`` checks that both agree.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.engine import FlagError
from proxy.sources.native.document import change_from_payload, reordered_only, seed_state, updated_at_ms
from proxy.sources.registry import DEFAULT
from proxy.store.change import Change, stored_text
from proxy.store.memory import MemoryStore
from proxy.store.state import OVERRIDES, RawState, apply_change

T1 = "2025-01-01T00:00:00.000Z"
T2 = "2025-02-01T00:00:00.000Z"
T3 = "2025-03-01T00:00:00.000Z"


def flag(enabled: bool = True, updated: str | None = None, **extra: Any) -> dict[str, Any]:
    definition: dict[str, Any] = {"enabled": enabled, **extra}
    if updated is not None:
        definition["updatedAt"] = updated
    return definition


def patch(upsert: dict[str, Any] | None = None, delete: list[str] | None = None, **top: Any) -> Change:
    body: dict[str, Any] = {**top}
    if upsert is not None:
        body["upsert"] = upsert
    if delete is not None:
        body["delete"] = delete
    return change_from_payload(body, actor="test")


def document(flags: dict[str, Any], **top: Any) -> Change:
    return change_from_payload({"flags": flags, **top}, actor="test")


def comparable(state: RawState) -> dict[str, Any]:
    out = state.to_json()
    out.pop("saved_at")
    return out


def native_store(document: dict[str, Any]) -> MemoryStore:
    """A memory store seeded with a native document, compiling with the real sources."""
    return MemoryStore(seed_state(document), compiler=DEFAULT)


def state_with(**flags: dict[str, Any]) -> RawState:
    state = RawState()
    result = apply_change(state, patch(upsert=flags))
    assert result.status == "applied"
    return state


# --- apply_change ----------------------------------------------------------------------------------


def test_updated_at_is_epoch_milliseconds() -> None:
    assert updated_at_ms({"updatedAt": "1970-01-01T00:00:01.500Z"}) == 1500
    assert updated_at_ms({"updatedAt": T1}) == 1735689600000
    assert updated_at_ms({"updatedAt": "2025-01-01T02:00:00+02:00"}) == 1735689600000
    assert updated_at_ms({}) is None


def test_first_change_applies_and_bumps_the_store_version() -> None:
    state = RawState()
    result = apply_change(state, patch(upsert={"a": flag(), "b": flag(False)}, version=3))
    assert (result.status, result.version, sorted(result.changed), result.ignored) == (
        "applied",
        1,
        ["a", "b"],
        [],
    )
    assert state.items("native") == {"a": stored_text(flag()), "b": stored_text(flag(False))}
    assert state.source_versions == {"native": {"flags": 3}}


@pytest.mark.parametrize("incoming", [5, 4, 0])
def test_source_version_not_newer_is_stale_and_changes_nothing(incoming: int) -> None:
    state = RawState()
    apply_change(state, patch(upsert={"a": flag()}, version=5))
    before = comparable(state)
    result = apply_change(state, patch(upsert={"a": flag(False), "z": flag()}, delete=[], version=incoming))
    assert result.status == "stale"
    assert result.stored_source_version == 5
    assert result.version == 1
    assert result.changed == [] and result.ignored == []
    assert comparable(state) == before
    assert result.to_json() == {"status": "stale", "version": 1, "changed": [], "stored_source_version": 5}


def test_stale_whole_document_deletes_nothing() -> None:
    state = RawState()
    apply_change(state, document({"a": flag(), "b": flag()}, version=9))
    before = comparable(state)
    result = apply_change(state, document({"c": flag()}, version=8))
    assert result.status == "stale"
    assert comparable(state) == before
    newer = apply_change(state, document({"c": flag()}, version=10))
    assert newer.status == "applied"
    assert sorted(newer.changed) == ["a", "b", "c"]
    assert set(state.items("native")) == {"c"}


def test_changes_without_a_source_version_are_never_stale() -> None:
    state = RawState()
    apply_change(state, patch(upsert={"a": flag()}, version=5))
    result = apply_change(state, patch(upsert={"a": flag(False)}))
    assert result.status == "applied"
    assert state.source_versions["native"]["flags"] == 5  # kept, not cleared


def test_older_item_is_ignored_and_the_rest_applies() -> None:
    state = state_with(a=flag(True, T2), b=flag(True, T2))
    result = apply_change(
        state,
        patch(upsert={"a": flag(False, T1), "b": flag(False, T3), "c": flag(False, T1)}),
    )
    assert result.status == "applied"
    assert result.ignored == ["a"]
    assert sorted(result.changed) == ["b", "c"]
    assert json.loads(state.items("native")["a"]) == flag(True, T2)
    assert json.loads(state.items("native")["b"]) == flag(False, T3)
    assert state.item_versions["native"]["flags"] == {
        "a": updated_at_ms({"updatedAt": T2}),
        "b": updated_at_ms({"updatedAt": T3}),
        "c": updated_at_ms({"updatedAt": T1}),
    }
    assert result.to_json()["ignored"] == ["a"]


def test_same_item_version_is_not_newer() -> None:
    state = state_with(a=flag(True, T2))
    result = apply_change(state, patch(upsert={"a": flag(False, T2)}))
    assert (result.status, result.ignored, result.version) == ("unchanged", ["a"], 1)
    assert json.loads(state.items("native")["a"]) == flag(True, T2)


def test_all_items_older_is_unchanged_and_keeps_the_version() -> None:
    state = state_with(a=flag(True, T3))
    result = apply_change(state, patch(upsert={"a": flag(False, T1)}))
    assert (result.status, result.version, result.changed, result.ignored) == ("unchanged", 1, [], ["a"])


def test_item_without_version_always_applies_and_keeps_the_stored_version() -> None:
    state = state_with(a=flag(True, T3))
    result = apply_change(state, patch(upsert={"a": flag(False)}))
    assert result.status == "applied"
    assert state.item_versions["native"]["flags"]["a"] == updated_at_ms({"updatedAt": T3})


def test_tombstone_keeps_older_upserts_out() -> None:
    state = state_with(a=flag(True, T1), b=flag())
    t2 = updated_at_ms({"updatedAt": T2})
    deleted = apply_change(state, Change(source="native", delete=["a"], item_versions={"a": t2}))
    assert (deleted.status, deleted.changed) == ("applied", ["a"])
    assert "a" not in state.items("native")
    assert state.item_versions["native"]["flags"]["a"] == t2  # the tombstone

    older = apply_change(state, patch(upsert={"a": flag(True, T1)}))
    assert (older.status, older.ignored) == ("unchanged", ["a"])
    assert "a" not in state.items("native")

    same = apply_change(state, patch(upsert={"a": flag(True, T2)}))
    assert same.ignored == ["a"] and "a" not in state.items("native")

    newer = apply_change(state, patch(upsert={"a": flag(False, T3)}))
    assert (newer.status, newer.changed) == ("applied", ["a"])
    assert json.loads(state.items("native")["a"]) == flag(False, T3)


def test_older_delete_is_ignored() -> None:
    state = state_with(a=flag(True, T2))
    result = apply_change(
        state, Change(source="native", delete=["a"], item_versions={"a": updated_at_ms({"updatedAt": T1})})
    )
    assert (result.status, result.ignored) == ("unchanged", ["a"])
    assert "a" in state.items("native")


def test_unversioned_delete_forgets_the_item_version() -> None:
    state = state_with(a=flag(True, T3))
    result = apply_change(state, patch(delete=["a"]))
    assert result.changed == ["a"]
    assert "a" not in state.item_versions["native"]["flags"]
    again = apply_change(state, patch(upsert={"a": flag(True, T1)}))  # no tombstone: it comes back
    assert again.changed == ["a"]


def test_deleting_a_missing_flag_is_unchanged() -> None:
    state = state_with(a=flag())
    result = apply_change(state, patch(delete=["nope"]))
    assert (result.status, result.version, result.changed) == ("unchanged", 1, [])


def test_replace_deletes_what_the_document_does_not_mention() -> None:
    state = state_with(a=flag(True, T3), b=flag(), c=flag())
    result = apply_change(state, document({"a": flag(False, T1), "b": flag()}))
    # a is older (ignored, kept), b is identical (no change), c is gone
    assert (result.status, result.changed, result.ignored) == ("applied", ["c"], ["a"])
    assert set(state.items("native")) == {"a", "b"}
    assert json.loads(state.items("native")["a"]) == flag(True, T3)


def test_identical_content_does_not_bump_the_version() -> None:
    state = state_with(a=flag(), b=flag(False))
    result = apply_change(state, document({"a": flag(), "b": flag(False)}))
    assert (result.status, result.version, result.changed) == ("unchanged", 1, [])
    # spacing does not matter: definitions are stored as compact JSON text
    reordered = change_from_payload(json.loads('{"upsert": {"a": {"enabled": true}}}'), actor="t")
    assert apply_change(state, reordered).status == "unchanged"


RGB = {"red": {"weight": 34}, "green": {"weight": 33}, "blue": {"weight": 33}}
BGR = {"blue": {"weight": 33}, "green": {"weight": 33}, "red": {"weight": 34}}


def test_declared_variant_order_is_stored_and_a_reordering_is_a_change() -> None:
    state = state_with(colour={"variants": RGB})
    assert list(json.loads(state.items("native")["colour"])["variants"]) == ["red", "green", "blue"]
    assert apply_change(state, patch(upsert={"colour": {"variants": RGB}})).status == "unchanged"
    result = apply_change(state, patch(upsert={"colour": {"variants": BGR}}))
    assert (result.status, result.version, result.changed) == ("applied", 2, ["colour"])
    assert list(json.loads(state.items("native")["colour"])["variants"]) == ["blue", "green", "red"]
    seeded = seed_state({"flags": {"colour": {"variants": RGB}}})
    assert list(json.loads(seeded.items("native")["colour"])["variants"]) == ["red", "green", "blue"]


def test_reordered_only_names_changes_that_just_move_keys() -> None:
    rule = {"if": True, "rollout": {"red": 1, "blue": 1}}
    assert reordered_only({"variants": RGB}, {"variants": BGR})
    assert reordered_only(
        {"variants": RGB, "rules": [rule]},
        {"variants": RGB, "rules": [{**rule, "rollout": {"blue": 1, "red": 1}}]},
    )
    assert not reordered_only(
        {"variants": RGB, "salt": "s"}, {"salt": "s", "variants": RGB}
    )  # field order only
    assert not reordered_only({"variants": RGB}, {"variants": {**BGR, "red": {"weight": 1}}})  # a real edit
    assert not reordered_only({"variants": RGB}, {"variants": RGB})


def test_unchanged_still_records_the_source_version() -> None:
    state = state_with(a=flag())
    result = apply_change(state, document({"a": flag()}, version=4))
    assert result.status == "unchanged"
    assert state.source_versions["native"]["flags"] == 4
    assert apply_change(state, document({"a": flag(False)}, version=4)).status == "stale"


def test_versions_are_per_source_and_kind() -> None:
    state = RawState()
    apply_change(state, patch(upsert={"a": flag()}, version=7))
    other = Change(source=OVERRIDES, upsert={"a": stored_text({"kill": True})}, source_version=1)
    assert apply_change(state, other).status == "applied"
    assert state.source_versions == {"native": {"flags": 7}, OVERRIDES: {"flags": 1}}


def test_each_applied_change_bumps_the_version_by_one() -> None:
    state = RawState()
    versions = [apply_change(state, patch(upsert={"a": flag(i % 2 == 0)})).version for i in range(6)]
    assert versions == [1, 2, 3, 4, 5, 6]


def test_raw_state_round_trips_through_json() -> None:
    state = state_with(a=flag(True, T1))
    apply_change(state, patch(upsert={"b": flag()}, version=3))
    again = RawState.from_json(json.loads(json.dumps(state.to_json())))
    assert comparable(again) == comparable(state)


# --- MemoryStore -----------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_memory_store_serves_each_applied_change() -> None:
    store = native_store({"flags": {"a": {"enabled": True}}})
    seen: list[int] = []
    store.on_change(lambda snapshot: seen.append(snapshot.version))
    assert store.ready and store.snapshot.version == 1
    result = run(store.apply(patch(upsert={"b": flag(False)})))
    assert (result.status, result.version) == ("applied", 2)
    assert store.snapshot.version == 2
    assert sorted(store.snapshot.flags) == ["a", "b"]
    assert store.snapshot.flags["b"].evaluate({"key": "u"}).value is False
    assert seen == [2]


def test_memory_store_stale_and_ignored_leave_the_snapshot_alone() -> None:
    store = MemoryStore()
    run(store.apply(patch(upsert={"a": flag(True, T2)}, version=2)))
    snapshot = store.snapshot
    seen: list[int] = []
    store.on_change(lambda s: seen.append(s.version))
    stale = run(store.apply(patch(upsert={"a": flag(False, T3)}, version=2)))
    assert stale.status == "stale" and stale.stored_source_version == 2
    ignored = run(store.apply(patch(upsert={"a": flag(False, T1)})))
    assert (ignored.status, ignored.ignored) == ("unchanged", ["a"])
    assert store.snapshot is snapshot
    assert seen == []
    assert run(store.audit(10))[0]["new_version"] == 1  # nothing logged for either


def test_memory_store_tombstone() -> None:
    store = MemoryStore()
    run(store.apply(patch(upsert={"a": flag(True, T1)})))
    tombstone = Change(source="native", delete=["a"], item_versions={"a": updated_at_ms({"updatedAt": T2})})
    assert run(store.apply(tombstone)).changed == ["a"]
    late = run(store.apply(patch(upsert={"a": flag(True, T1)})))
    assert (late.status, late.ignored) == ("unchanged", ["a"])
    assert "a" not in store.snapshot.flags


def test_memory_store_overrides_kill_and_promote() -> None:
    store = native_store(
        {"flags": {"x": {"variants": {"a": {"weight": 1}, "b": {"weight": 1}}, "defaultVariant": "a"}}}
    )
    kill = Change(source=OVERRIDES, upsert={"x": stored_text({"kill": True})}, actor="admin", action="kill")
    run(store.apply(kill))
    values = {store.snapshot.flags["x"].evaluate({"key": f"u{i}"}).value for i in range(50)}
    assert values == {"a"}
    promote = Change(source=OVERRIDES, upsert={"x": stored_text({"promote": "b"})}, action="promote")
    run(store.apply(promote))
    values = {store.snapshot.flags["x"].evaluate({"key": f"u{i}"}).value for i in range(50)}
    assert values == {"b"}
    run(store.apply(Change(source=OVERRIDES, delete=["x"], action="restore")))
    values = {store.snapshot.flags["x"].evaluate({"key": f"u{i}"}).value for i in range(50)}
    assert values == {"a", "b"}


def test_memory_store_audit_is_newest_first_and_capped() -> None:
    store = MemoryStore(audit_max=3)
    for i in range(5):
        run(store.apply(Change(source="native", upsert={f"f{i}": stored_text(flag())}, actor=f"actor{i}")))
    run(store.apply(patch(delete=["f4"])))
    entries = run(store.audit(10))
    assert len(entries) == 3
    assert [(e["flag"], e["action"], e["old_version"], e["new_version"]) for e in entries] == [
        ("f4", "delete", 5, 6),
        ("f4", "upsert", 4, 5),
        ("f3", "upsert", 3, 4),
    ]
    assert entries[1]["actor"] == "actor4" and entries[1]["source"] == "native"
    assert entries[0]["time"].endswith("Z")
    assert run(store.audit(1)) == entries[:1]


def test_document_versions_stay_exact_in_redis() -> None:
    """Redis compares versions in Lua (doubles): the largest accepted version is 2^53 - 1."""
    assert patch(upsert={}, version=2**53 - 1).source_version == 2**53 - 1
    for bad in (2**53, 10**19, -1, 1.5, True, "3"):
        with pytest.raises(FlagError) as info:
            patch(upsert={}, version=bad)
        assert info.value.path == "version"
