"""Which of two states of a shared store wins, and whether one holds everything the other served.

A store version names content only within its *generation* (``RawState.generation``): every seed
or re-seed of Redis starts a new one, recording the content it was written from (its base). Two
states that share a generation lie on one history, so the higher version holds the lower one. A
state still at its generation's seed *is* its base, so its oldest name is the base's (``origin``);
that keeps "instance B re-seeded version 3, instance A re-seeded version 5 of the same history"
recognisable as one history. Beyond one re-seed the answer is conservative: a history that cannot be
shown to hold ``mine`` is treated as not holding it (a loud false alarm, never a silent loss).
"""

from __future__ import annotations

from proxy.store.state import RawState


def origin(state: RawState) -> tuple[str, int]:
    """The oldest (generation, version) that names ``state``'s content."""
    generation = state.generation
    if generation.base_version >= 0 and state.version == generation.base_version:
        return generation.base_id, generation.base_version
    return generation.id, state.version


def holds(theirs: RawState, mine: RawState) -> bool:
    """Does ``theirs`` hold every change ``mine`` was built from (is it ``mine`` or later)?"""
    if theirs.generation.id == mine.generation.id:
        return theirs.version >= mine.version
    name, version = origin(mine)
    if theirs.generation.id == name:
        return theirs.version >= version
    base = theirs.generation
    return base.base_version >= 0 and base.base_id == name and base.base_version >= version


def restore_version(mine: RawState, theirs: RawState) -> int | None:
    """The version to write ``mine`` back into Redis as, when Redis (``theirs``) stepped back
    below it; ``None`` when Redis is as new or newer (the highest version wins).

    A tie between two histories (same number, ``theirs`` not holding ``mine``) goes to ``mine``
    under the next number, so that no instance ever sees one version with two contents.
    """
    if theirs.version < mine.version:
        return mine.version
    if theirs.version == mine.version and not holds(theirs, mine):
        return mine.version + 1
    return None
