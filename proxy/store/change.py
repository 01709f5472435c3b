"""What a source hands the store: a ``Change`` to one kind of items (flags, segments)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_text(value: Any) -> str:
    """The JSON text a definition is stored as: compact, object members in their declared order.

    Order is kept because it can mean something (variant weights are laid out in declaration order,
    the first variant is the default); so equal text means an equal definition, and re-ordering the
    variants is a real change.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Change:
    source: str
    kind: str = "flags"
    upsert: dict[str, str] = field(default_factory=dict)  # key → stored JSON text (see stored_text)
    delete: list[str] = field(default_factory=list)
    replace: bool = False
    source_version: int | None = None
    item_versions: dict[str, int] = field(default_factory=dict)
    # When the change was made (epoch ms; a signed webhook's t): the version of each item without one
    # of its own, applied unless the stored item is newer. None: such items are unordered.
    stamp: int | None = None
    supersede: bool = False  # with a stamp: always applies, keeping the higher version (admin writes)
    delivery: str = ""  # the sender's delivery id: a second change with it is a duplicate
    delivery_ttl_s: int = 0  # how long the id is remembered (the signature's tolerance window)
    actor: str = ""
    action: str = ""  # audit wording ("kill", "promote"…); default: upsert / delete per item

    def payload(self, audit_max: int) -> dict[str, Any]:
        """The JSON the Redis script takes."""
        return {
            "source": self.source,
            "kind": self.kind,
            "upsert": [[k, v, self.item_versions.get(k, -1)] for k, v in self.upsert.items()],
            "delete": [[k, self.item_versions.get(k, -1)] for k in self.delete],
            "replace": self.replace,
            "source_version": -1 if self.source_version is None else self.source_version,
            "stamp": -1 if self.stamp is None else self.stamp,
            "supersede": self.supersede,
            "delivery_ttl": self.delivery_ttl_s if self.delivery else 0,
            "actor": self.actor,
            "action": self.action,
            "time": now_iso(),
            "audit_max": audit_max,
        }
