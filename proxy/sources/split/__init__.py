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
``MATCHES_STRING`` runs on RE2 (linear time, ``proxy.engine.patterns``) where the SDK uses Python's
``re``: a pattern RE2 refuses (backreferences, lookarounds, possessive quantifiers) makes that split a
problem, ``\\d \\w \\s \\b`` are ASCII only, ``$`` matches only at the very end, and a value longer than
``MAX_INPUT_CHARS`` (8,192) does not match.

Stored formats (``compile_source("split", kinds, cache)``, one JSON text per item):

- ``flags``: ``{flag name: the raw split JSON object}`` (as in ``ff.d[]``);
- ``segments``: ``{segment name: JSON list of member keys}`` (a segmentChanges object is accepted too);
- ``rbsegments``: ``{name: the raw rule-based segment JSON object}`` (as in ``rbs.d[]``).

Problems are keyed by flag name, or ``"segments:<name>"`` / ``"rbsegments:<name>"`` for other items.

Modules: ``hashing`` (murmur3, legacy hash, buckets), ``semver`` (the SDK's version parser and
ordering), ``documents`` (splitChanges / segmentChanges parsing, referenced segments), ``matchers``
(input conversions and matcher compilation), ``evaluator`` (flags, conditions, rule-based segments,
entry points), ``sync`` (the background pull from Split's API), ``impressions`` (the impressions and
events the SDK would record, and their payloads) and ``analytics`` (queueing and sending them:
``SplitSource.analytics``); ``sync`` and ``analytics`` are imported on first use of their names
here, so that compiling flags does not load the HTTP client or the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.engine import Flag
from proxy.sources.base import Analytics, Compiled, Sync, SyncContext
from proxy.sources.split.documents import (
    load_segments,
    parse_split_changes,
    referenced_segments,
    segment_members,
)
from proxy.sources.split.evaluator import (
    CONTROL,
    CONTROL_SERVED,
    LABEL_EXCEPTION,
    LABEL_KILLED,
    LABEL_NO_CONDITION_MATCHED,
    LABEL_NOT_FOUND,
    LABEL_NOT_IN_SPLIT,
    LABEL_PREREQUISITES_NOT_MET,
    LABEL_UNSUPPORTED,
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    REASON_INVALID_KEY,
    compile_items,
    compile_split,
    load_file,
)
from proxy.sources.split.hashing import bucket, is_murmur, legacy_hash, murmur_hash
from proxy.sources.split.matchers import NOT_ATTRIBUTES
from proxy.sources.split.semver import SplitSemver, compare_semver, parse_semver
from proxy.sources.split.settings import SplitSettings

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from proxy.config import Settings
    from proxy.control.index import Endpoint
    from proxy.sources.split.analytics import SplitAnalytics
    from proxy.sources.split.sync import SplitApiError, SplitSync

__all__ = [
    "CONTROL",
    "CONTROL_SERVED",
    "LABEL_EXCEPTION",
    "LABEL_KILLED",
    "LABEL_NOT_FOUND",
    "LABEL_NOT_IN_SPLIT",
    "LABEL_NO_CONDITION_MATCHED",
    "LABEL_PREREQUISITES_NOT_MET",
    "LABEL_UNSUPPORTED",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "NOT_ATTRIBUTES",
    "REASON_INVALID_KEY",
    "SplitAnalytics",
    "SplitApiError",
    "SplitSemver",
    "SplitSettings",
    "SplitSource",
    "SplitSync",
    "bucket",
    "compare_semver",
    "compile_items",
    "compile_split",
    "is_murmur",
    "legacy_hash",
    "load_file",
    "load_segments",
    "murmur_hash",
    "parse_semver",
    "parse_split_changes",
    "referenced_segments",
    "segment_members",
]

_FROM_SYNC = frozenset({"SplitApiError", "SplitSync"})


def __getattr__(name: str) -> Any:
    """``SplitSync``, ``SplitApiError`` and ``SplitAnalytics``, from ``sync`` and ``analytics`` on first
    use (they need httpx and the metrics)."""
    if name in _FROM_SYNC:
        from proxy.sources.split import sync

        return getattr(sync, name)
    if name == "SplitAnalytics":
        from proxy.sources.split import analytics

        return analytics.SplitAnalytics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SplitSource:
    """Split definitions: pulled from Split's API (``[split] sdk_key``), or a splitChanges file."""

    name: str = "split"
    kinds: tuple[str, ...] = ("flags", "segments", "rbsegments")
    settings_type: type | None = SplitSettings

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        return compile_items(kinds, cache)

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        return load_file(path, segments_dir)

    def sync(self, context: SyncContext) -> Sync | None:
        from proxy.sources.split.sync import SplitSync  # the HTTP client only where the proxy runs

        return SplitSync(context.section or SplitSettings(), context.store, metrics=context.metrics)

    def analytics(self, context: SyncContext) -> Analytics | None:
        """Impressions and events to Split's APIs (``analytics``), when ``[split] sdk_key`` is set."""
        settings = context.section or SplitSettings()
        if not settings.sdk_key:
            return None
        from proxy.sources.split.analytics import SplitAnalytics

        return SplitAnalytics(settings, metrics=context.metrics)

    def webhook_routes(self) -> list[BaseRoute]:
        from proxy.sources.split.webhook import ROUTES

        return list(ROUTES)

    def webhook_endpoints(self, settings: Settings) -> list[Endpoint]:
        from proxy.control.index import Endpoint

        section = settings.section(self.name)
        on = bool(getattr(section, "webhook_token", ""))
        what = "Split's change notifications (a pull follows)"
        return [
            Endpoint(
                "/webhooks/split", what, on, "[split] webhook_token", "?token=<webhook token>", ("POST",)
            )
        ]
