"""Conformance of proxy/sources/split/ against the official Python SDK (splitio-client 10.7.0).

Two oracles, both required to agree on every (flag, key) with zero mismatches:

* **localhost JSON mode** (the public client, recipe of docs/split.md §9): explicit non-zero seeds,
  ``algo: 2``, a final ROLLOUT condition holding ALL_KEYS (in flags *and* rule-based segments, which
  localhost mode sanitises the same way), both ``ff`` and ``rbs`` sections. Treatment, configuration
  and impression label are compared (labels through the SDK's evaluator, as §9 describes), and a
  slice of keys also goes through ``get_treatments_with_config``.
* **the SDK evaluator over ``from_raw`` models**, without localhost sanitisation: legacy hashing
  (``algo: 1``), flags without a catch-all condition, rule-based segments as written, missing
  rule-based segments, dependency cycles, seeds that are not integers — each flag evaluated alone, an
  exception meaning ``control`` (what ``get_treatment`` returns).

The corpora come from a seeded generator (reproducible; set SPLIT_CONFORMANCE_SEED to explore).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

splitio = pytest.importorskip(
    "splitio",
    reason="splitio-client (the official Split SDK) is not installed: pip install splitio-client==10.7.0",
)

from splitio import get_factory  # noqa: E402
from splitio.client.key import Key  # noqa: E402
from splitio.engine.evaluator import EvaluationContext, Evaluator  # noqa: E402
from splitio.engine.hashfns.legacy import legacy_hash as sdk_legacy_hash  # noqa: E402
from splitio.engine.hashfns.murmur3py import murmur32_py  # noqa: E402
from splitio.engine.splitters import Splitter  # noqa: E402
from splitio.models import rule_based_segments as sdk_rbs  # noqa: E402
from splitio.models import splits as sdk_splits  # noqa: E402
from splitio.models.fallback_config import FallbackTreatmentCalculator  # noqa: E402
from splitio.models.grammar.matchers.utils.utils import build_semver_or_none  # noqa: E402

from proxy.dataplane.context import make_context  # noqa: E402
from proxy.sources.split import (  # noqa: E402
    bucket,
    compare_semver,
    compile_split,
    legacy_hash,
    load_file,
    murmur_hash,
    parse_semver,
)

SEED = int(os.environ.get("SPLIT_CONFORMANCE_SEED", "20251015"))
TREATMENTS = ["on", "off", "v1", "v2", "v3"]
BASE_TS = 1_700_000_000  # seconds
VERSIONS = [
    "1.0.0", "1.2.3", "1.2.3-beta.1", "1.2.3-beta.10", "1.2.3-beta.2", "1.2.3-alpha", "1.2.3-rc.1+meta",
    "1.2.3+build.5", "2.0.0", "2.0.0-0", "01.2.3", "1.2", "v1.2.3", "1.2.3-01", "10.0.0", "1.10.0",
    "1.2.3-alpha.beta", "1.2.3-", "1.2.3+", "0.0.1",
]  # fmt: skip
SUPPORTED_MATCHERS = (
    "ALL_KEYS",
    "IN_SEGMENT",
    "IN_RULE_BASED_SEGMENT",
    "WHITELIST",
    "EQUAL_TO",
    "GREATER_THAN_OR_EQUAL_TO",
    "LESS_THAN_OR_EQUAL_TO",
    "BETWEEN",
    "EQUAL_TO_SET",
    "PART_OF_SET",
    "CONTAINS_ANY_OF_SET",
    "CONTAINS_ALL_OF_SET",
    "STARTS_WITH",
    "ENDS_WITH",
    "CONTAINS_STRING",
    "MATCHES_STRING",
    "EQUAL_TO_BOOLEAN",
    "IN_SPLIT_TREATMENT",
    "EQUAL_TO_SEMVER",
    "GREATER_THAN_OR_EQUAL_TO_SEMVER",
    "LESS_THAN_OR_EQUAL_TO_SEMVER",
    "BETWEEN_SEMVER",
    "IN_LIST_SEMVER",
)
SEGMENT_NAMES = ["seg_a", "seg_b", "seg_c", "seg_missing"]  # seg_missing has no file
EMAILS = ["ann@acme.com", "bob@example.org", "carl@acme.co", "dan@ACME.com", "", 5, "eve@acme.com.br"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_loggers() -> Iterator[None]:
    """The SDK and the corpus' deliberate oddities log a lot; restore the levels afterwards."""
    loggers = [logging.getLogger(name) for name in ("splitio", "proxy.sources.split")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


# --- generator -------------------------------------------------------------------------------------


class Corpus:
    """Random but reproducible definitions, segments, rule-based segments and keys."""

    def __init__(self, seed: int, flags: int, keys: int, raw_mode: bool = False) -> None:
        self.rng = random.Random(seed)
        self.raw_mode = raw_mode  # True: no localhost recipe (legacy algo, odd seeds, cycles, ...)
        self.key_pool = self._key_pool(keys)
        self.segments = {
            name: sorted(self.rng.sample(self.key_pool, k=len(self.key_pool) // 4))
            for name in SEGMENT_NAMES[:3]
        }
        self.flag_names: list[str] = []
        self.rbs: list[dict[str, Any]] = []
        for i in range(6):
            self.rbs.append(self._rule_based_segment(i))
        self.flags: list[dict[str, Any]] = []
        for i in range(flags):
            flag = self._flag(i)
            self.flags.append(flag)
            self.flag_names.append(flag["name"])
        for index in (3, 11):  # later flags may depend on these: they must read as not found
            self.flags[index]["status"] = "ARCHIVED"
        if raw_mode:
            self._add_raw_specials()
        self.keys = [self._key(k) for k in self.key_pool]

    # keys and attributes

    def _key_pool(self, n: int) -> list[str]:
        styles = [
            lambda i: f"user{i}",
            lambda i: f"ключ{i}",
            lambda i: f"用户{i}",
            lambda i: f"emoji😀{i}",
            lambda i: f"a b {i}",
            lambda i: f"k{i}@acme.com",
            lambda i: "".join(
                self.rng.choices(string.ascii_letters + string.digits, k=self.rng.randint(1, 40))
            ),
        ]
        pool: list[str] = []
        while len(pool) < n:
            key = self.rng.choice(styles)(len(pool))
            if key not in pool:
                pool.append(key)
        return pool

    def _key(self, matching: str) -> tuple[str, str | None, dict[str, Any]]:
        r = self.rng.random()
        bucketing = (
            None if r < 0.65 else (f"b{self.rng.randrange(10**9)}" if r < 0.9 else f"\u0431-{matching}")
        )
        return matching, bucketing, self._attributes()

    def _attributes(self) -> dict[str, Any]:
        rng = self.rng
        attrs: dict[str, Any] = {}
        if rng.random() < 0.8:
            attrs["age"] = rng.choice(
                [rng.randint(0, 100)] * 6 + [str(rng.randint(0, 100)), 42.0, 17.5, True, "x"]
            )
        if rng.random() < 0.8:
            ts = BASE_TS + rng.randint(-5 * 86400, 5 * 86400)
            attrs["ts"] = ts if rng.random() < 0.85 else str(ts)
        if rng.random() < 0.8:
            attrs["email"] = rng.choice(EMAILS)
        if rng.random() < 0.8:
            attrs["plan"] = rng.choice(["free", "pro", "enterprise", "Pro"])
        if rng.random() < 0.8:
            attrs["tags"] = rng.choice(
                [rng.sample("abcd", k=rng.randint(0, 4))] * 5 + ["ab", 7, ["a", 1], {"a": 1}]  # type: ignore[list-item]
            )
        if rng.random() < 0.8:
            attrs["version"] = rng.choice(VERSIONS)
        if rng.random() < 0.8:
            attrs["beta"] = rng.choice([True, False, "true", "FALSE", " true ", "yes", 1, "1"])
        if rng.random() < 0.5:
            attrs["country"] = rng.choice(["us", "de", "fr", "br"])
        return attrs

    # definitions

    def _seed(self) -> Any:
        value = self.rng.randint(-(2**31), 2**31 - 1) or 7
        if self.raw_mode and self.rng.random() < 0.05:
            return self.rng.choice([0, 2**31, -(2**31) - 1, 2**40 + 3])
        return value

    def _matcher(self, kinds: list[str] | None = None) -> dict[str, Any]:
        rng = self.rng
        kinds = kinds or [*SUPPORTED_MATCHERS, "IN_SEGMENT", "WHITELIST", "IN_SPLIT_TREATMENT"]
        kind = rng.choice(kinds)
        attribute: str | None = None
        m: dict[str, Any] = {"matcherType": kind, "negate": rng.random() < 0.25}
        if kind == "IN_SEGMENT":
            m["userDefinedSegmentMatcherData"] = {"segmentName": rng.choice(SEGMENT_NAMES)}
            attribute = None if rng.random() < 0.85 else rng.choice(["plan", "nope"])
        elif kind == "IN_RULE_BASED_SEGMENT":
            names = [r["name"] for r in self.rbs] or ["rbs_none"]
            m["userDefinedSegmentMatcherData"] = {"segmentName": rng.choice(names)}
        elif kind == "WHITELIST":
            attribute = rng.choice([None, None, "plan", "country", "email", "age"])
            pool = {
                None: self.key_pool,
                "plan": ["free", "pro", "Pro"],
                "country": ["us", "de"],
                "email": [*EMAILS[:4], "5"],
                "age": ["42", "17", "true", "42.0"],
            }[attribute]
            m["whitelistMatcherData"] = {"whitelist": rng.sample(pool, k=max(1, len(pool) // 3))}
        elif kind in ("STARTS_WITH", "ENDS_WITH", "CONTAINS_STRING"):
            attribute = rng.choice([None, "email", "email", "plan"])
            pool = {
                "STARTS_WITH": ["ann", "b", "user1", "ключ", "a b", "P", ""],
                "ENDS_WITH": ["@acme.com", ".org", "1", "9", "o", "😀3"],
                "CONTAINS_STRING": ["acme", "@", "ser2", "😀", "ro", "ACME"],
            }[kind]
            m["whitelistMatcherData"] = {"whitelist": rng.sample(pool, k=rng.randint(1, 3))}
        elif kind == "MATCHES_STRING":
            attribute = rng.choice([None, "email", "email", "plan", "age"])
            m["stringMatcherData"] = rng.choice(
                [r"^user\d$", r"@acme\.(com|co)$", r"\d{2}", r"(?i)ACME", "^$", "[абв]", r"^4\d$"]
            )
        elif kind in ("EQUAL_TO", "GREATER_THAN_OR_EQUAL_TO", "LESS_THAN_OR_EQUAL_TO", "BETWEEN"):
            datetime = rng.random() < 0.4
            attribute = "ts" if datetime else rng.choice(["age", "age", "age", "plan"])

            def value() -> int:
                if datetime:
                    return (BASE_TS + rng.randint(-5 * 86400, 5 * 86400)) * 1000 + rng.randint(0, 999)
                return rng.randint(0, 100)

            kind_data = "DATETIME" if datetime else "NUMBER"
            if kind == "BETWEEN":
                a, b = sorted((value(), value()))
                m["betweenMatcherData"] = {"dataType": kind_data, "start": a, "end": b}
            else:
                m["unaryNumericMatcherData"] = {"dataType": kind_data, "value": value()}
        elif kind.endswith("_SET"):
            attribute = rng.choice(["tags", "tags", "tags", "plan"])
            m["whitelistMatcherData"] = {"whitelist": rng.sample("abcd", k=rng.randint(1, 3))}
        elif kind == "EQUAL_TO_BOOLEAN":
            attribute = "beta"
            m["booleanMatcherData"] = rng.random() < 0.5
        elif kind == "IN_SPLIT_TREATMENT":
            deps = self.flag_names[-30:] or ["no_such_flag"]
            target = rng.choice(deps) if rng.random() < 0.95 else "no_such_flag"
            m["dependencyMatcherData"] = {
                "split": target,
                "treatments": rng.sample([*TREATMENTS, "control"], k=rng.randint(1, 3)),
            }
        elif kind in ("EQUAL_TO_SEMVER", "GREATER_THAN_OR_EQUAL_TO_SEMVER", "LESS_THAN_OR_EQUAL_TO_SEMVER"):
            attribute = rng.choice(["version", "version", "version", "age"])
            m["stringMatcherData"] = rng.choice(VERSIONS)
        elif kind == "BETWEEN_SEMVER":
            attribute = "version"
            m["betweenStringMatcherData"] = {"start": rng.choice(VERSIONS), "end": rng.choice(VERSIONS)}
        elif kind == "IN_LIST_SEMVER":
            attribute = "version"
            m["whitelistMatcherData"] = {"whitelist": rng.sample(VERSIONS, k=rng.randint(1, 6))}
        elif kind == "IN_LARGE_SEGMENT":
            m["userDefinedLargeSegmentMatcherData"] = {"largeSegmentName": "large"}
        m["keySelector"] = {"trafficType": "user", "attribute": attribute}
        return m

    def _partitions(self, treatments: list[str]) -> list[dict[str, Any]]:
        rng = self.rng
        if rng.random() < 0.3:
            return [{"treatment": rng.choice(treatments), "size": 100}]
        chosen = rng.sample(treatments, k=rng.randint(1, len(treatments)))
        total = 100 if rng.random() < 0.9 else rng.randint(1, 99)  # below 100: the tail gets control
        cuts = sorted(rng.randint(0, total) for _ in range(len(chosen) - 1))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
        return [{"treatment": t, "size": s} for t, s in zip(chosen, sizes, strict=True)]

    def _condition(self, kind: str, label: str, treatments: list[str] | None, n: int) -> dict[str, Any]:
        condition: dict[str, Any] = {
            "conditionType": kind,
            "matcherGroup": {"combiner": "AND", "matchers": [self._matcher() for _ in range(n)]},
            "label": label,
        }
        if treatments is not None:
            condition["partitions"] = self._partitions(treatments)
        return condition

    def _catch_all(self, treatments: list[str] | None, label: str) -> dict[str, Any]:
        """The last condition localhost mode requires: ROLLOUT with ALL_KEYS (here maybe narrowed)."""
        condition = self._condition("ROLLOUT", label, treatments, 0)
        matchers = condition["matcherGroup"]["matchers"]
        matchers.append({"keySelector": None, "matcherType": "ALL_KEYS", "negate": False})
        if self.rng.random() < 0.5:
            matchers.insert(self.rng.randint(0, 1), self._matcher())
        return condition

    def _rule_based_segment(self, i: int) -> dict[str, Any]:
        rng = self.rng
        earlier = [r["name"] for r in self.rbs]
        conditions = [
            self._condition("WHITELIST", "", None, rng.randint(1, 2)) for _ in range(rng.randint(0, 2))
        ]
        for c in conditions:  # a rule-based segment must not point at itself or later ones
            for m in c["matcherGroup"]["matchers"]:
                if m["matcherType"] == "IN_RULE_BASED_SEGMENT":
                    m["userDefinedSegmentMatcherData"]["segmentName"] = rng.choice(earlier or ["rbs_0"])
                    if not earlier:
                        m["matcherType"] = "ALL_KEYS"
        if not self.raw_mode or rng.random() < 0.5:
            last = self._catch_all(None, "")
            for m in last["matcherGroup"]["matchers"]:
                if m["matcherType"] == "IN_RULE_BASED_SEGMENT":
                    m["matcherType"] = "ALL_KEYS"
            conditions.append(last)
        excluded_segments = []
        for _ in range(rng.randint(0, 3)):
            if earlier and rng.random() < 0.6:  # nested: its own exclusions and conditions count
                excluded_segments.append({"name": rng.choice(earlier), "type": "rule-based"})
            else:
                excluded_segments.append({"name": rng.choice(SEGMENT_NAMES), "type": "standard"})
        return {
            "name": f"rbs_{i}",
            "trafficTypeName": "user",
            "changeNumber": 10 + i,
            "status": "ACTIVE",
            "excluded": {
                "keys": rng.sample(self.key_pool, k=rng.randint(0, len(self.key_pool) // 5)),
                "segments": excluded_segments,
            },
            "conditions": conditions,
        }

    def _flag(self, i: int) -> dict[str, Any]:
        rng = self.rng
        treatments = rng.sample(TREATMENTS, k=rng.randint(1, 4))
        default = rng.choice([*treatments, "off"]) if rng.random() < 0.96 else "control"
        conditions = []
        for j in range(rng.randint(0, 3)):
            kind = rng.choice(["WHITELIST", "ROLLOUT"])
            conditions.append(self._condition(kind, f"rule {j}", treatments, rng.randint(1, 3)))
        if not self.raw_mode or rng.random() < 0.6:
            conditions.append(self._catch_all(treatments, "default rule"))
        if rng.random() < 0.03:  # unsupported by the Python SDK: the whole flag serves control
            large = self._condition(rng.choice(["WHITELIST", "ROLLOUT"]), "large", treatments, 0)
            large["matcherGroup"]["matchers"] = [self._matcher(["IN_LARGE_SEGMENT"])]
            conditions.insert(rng.randint(0, max(0, len(conditions) - 1)), large)
        flag: dict[str, Any] = {
            "trafficTypeName": "user",
            "name": f"flag_{i:03d}",
            "trafficAllocation": 100 if rng.random() < 0.6 else rng.randint(0, 99),
            "trafficAllocationSeed": self._seed(),
            "seed": self._seed(),
            "status": "ACTIVE",
            "killed": rng.random() < 0.08,
            "defaultTreatment": default,
            "changeNumber": 1_700_000_000_000 + i,
            "algo": 2 if not self.raw_mode or rng.random() < 0.5 else 1,
            "conditions": conditions,
            "sets": [],
            "impressionsDisabled": False,
        }
        if rng.random() < 0.45:
            options = [
                '{"color":"blue","n":3}',
                "[1, 2]",
                '"text"',
                "not json",
                '{"nested":{"a":[true,null]}}',
            ]
            flag["configurations"] = {
                t: rng.choice(options)
                for t in rng.sample([*treatments, "off", "control"], k=rng.randint(1, 3))
            }
        if self.flag_names and rng.random() < 0.2:
            flag["prerequisites"] = [
                {"n": rng.choice(self.flag_names[-40:]), "ts": rng.sample(TREATMENTS, k=rng.randint(1, 3))}
                for _ in range(rng.randint(1, 2))
            ]
        return flag

    def _add_raw_specials(self) -> None:
        """Cases localhost mode cannot express; only the raw oracle sees them."""
        rng = self.rng
        base = len(self.flags)

        def special(i: int, **changes: Any) -> dict[str, Any]:
            flag = self._flag(base + i)
            flag.update(changes)
            flag["killed"] = False
            self.flags.append(flag)
            self.flag_names.append(flag["name"])
            return flag

        all_keys = {"keySelector": None, "matcherType": "ALL_KEYS", "negate": False}

        def depends_on(name: str) -> dict[str, Any]:
            return {
                "conditionType": "ROLLOUT",
                "label": "dep",
                "partitions": [{"treatment": "on", "size": 100}],
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [
                        {
                            "keySelector": None,
                            "matcherType": "IN_SPLIT_TREATMENT",
                            "negate": False,
                            "dependencyMatcherData": {"split": name, "treatments": ["on", "off"]},
                        }
                    ],
                },
            }

        # a dependency cycle (a -> b -> a) and a prerequisite cycle (c -> c)
        a, b = f"flag_{base:03d}", f"flag_{base + 1:03d}"
        special(0, conditions=[depends_on(b)], trafficAllocation=100)
        special(1, conditions=[depends_on(a)], trafficAllocation=100)
        c = f"flag_{base + 2:03d}"
        special(2, prerequisites=[{"n": c, "ts": ["on"]}], defaultTreatment="off")
        # a rule-based segment that is not stored (archived)
        gone = {"name": "rbs_gone", "status": "ARCHIVED", "trafficTypeName": "user", "changeNumber": 1,
                "excluded": {"keys": [], "segments": []}, "conditions": []}  # fmt: skip
        self.rbs.append(gone)
        special(
            3,
            conditions=[
                {
                    "conditionType": "WHITELIST",
                    "label": "w",
                    "partitions": [{"treatment": "v1", "size": 100}],
                    "matcherGroup": {"combiner": "AND", "matchers": [self._matcher(["WHITELIST"])]},
                },
                {
                    "conditionType": "ROLLOUT",
                    "label": "rb",
                    "partitions": [{"treatment": "on", "size": 100}],
                    "matcherGroup": {
                        "combiner": "AND",
                        "matchers": [
                            {
                                "keySelector": None,
                                "matcherType": "IN_RULE_BASED_SEGMENT",
                                "negate": False,
                                "userDefinedSegmentMatcherData": {"segmentName": "rbs_gone"},
                            }
                        ],
                    },
                },
            ],
        )
        # seeds that are not integers: fine until a hash is needed
        special(4, trafficAllocation=50, trafficAllocationSeed=None, seed=3)
        special(5, trafficAllocation=100, seed=None)
        # an unsupported matcher inside a rule-based segment: every key not excluded is a member
        self.rbs.append(
            {
                "name": "rbs_large",
                "status": "ACTIVE",
                "trafficTypeName": "user",
                "changeNumber": 2,
                "excluded": {"keys": rng.sample(self.key_pool, k=3), "segments": []},
                "conditions": [
                    {
                        "conditionType": "WHITELIST",
                        "matcherGroup": {
                            "combiner": "AND",
                            "matchers": [self._matcher(["IN_LARGE_SEGMENT"])],
                        },
                    }
                ],
            }
        )
        special(
            6,
            conditions=[
                {
                    "conditionType": "ROLLOUT",
                    "label": "in large rbs",
                    "partitions": [{"treatment": "on", "size": 50}, {"treatment": "off", "size": 50}],
                    "matcherGroup": {
                        "combiner": "AND",
                        "matchers": [
                            {
                                "keySelector": None,
                                "matcherType": "IN_RULE_BASED_SEGMENT",
                                "negate": False,
                                "userDefinedSegmentMatcherData": {"segmentName": "rbs_large"},
                            },
                            all_keys,
                        ],
                    },
                }
            ],
        )
        # prerequisites failing with defaultTreatment "control": the conditions still decide
        special(7, defaultTreatment="control", prerequisites=[{"n": self.flag_names[0], "ts": ["nothing"]}])

    # outputs

    def split_changes(self) -> dict[str, Any]:
        return {
            "ff": {"d": copy.deepcopy(self.flags), "s": -1, "t": 1_800_000_000_000},
            "rbs": {"d": copy.deepcopy(self.rbs), "s": -1, "t": 1_800_000_000_000},
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        flags_file = directory / "splits.json"
        flags_file.write_text(json.dumps(self.split_changes()), encoding="utf-8")
        segments = directory / "segments"
        segments.mkdir()
        for name, members in self.segments.items():
            document = {
                "name": name,
                "added": [*members, "ghost"],
                "removed": ["ghost"],
                "since": -1,
                "till": 5,
            }
            (segments / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")
        return flags_file, segments


# --- comparison helpers ----------------------------------------------------------------------------


def _same_config(sdk: Any, ours: Any, has_config: bool) -> bool:
    if sdk is None:
        return not has_config
    if not has_config:
        return False
    try:
        return json.loads(sdk) == ours
    except ValueError:
        return sdk == ours


def _context(matching: str, bucketing: str | None, attrs: dict[str, Any]) -> dict[str, Any]:
    return make_context(matching, attrs, bucketing)


def _ours(flag: Any, matching: str, bucketing: str | None, attrs: dict[str, Any]) -> tuple[Any, Any]:
    """(outcome, label) from ``explain``; ``evaluate`` (the separate hot path) must agree exactly."""
    context = _context(matching, bucketing, attrs)
    served, why = flag.explain(context)
    fast = flag.evaluate(context)
    if fast is not served:
        return ("evaluate/explain disagree", fast, served), why["reason"]
    return served, why["reason"]


# --- localhost-mode oracle -------------------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[SEED, pytest.param(SEED + 100, marks=pytest.mark.slow)],  # the second corpus: make test-slow
    ids=["corpus1", "corpus2"],
)
def localhost_corpus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Corpus, Any, dict[str, Any]]]:
    corpus = Corpus(request.param, flags=300, keys=300)
    flags_file, segments = corpus.write(tmp_path_factory.mktemp("split_localhost"))
    factory = get_factory(
        "localhost",
        config={
            "splitFile": str(flags_file),
            "segmentDirectory": str(segments),
            "localhostRefreshEnabled": False,
        },
    )
    factory.block_until_ready(10)
    ours = load_file(flags_file, segments)
    yield corpus, factory.client(), ours
    factory.destroy()


def test_localhost_oracle_treatments_configs_and_labels(
    localhost_corpus: tuple[Corpus, Any, dict[str, Any]],
) -> None:
    corpus, client, ours = localhost_corpus
    names = [f["name"] for f in corpus.flags]
    active = [f["name"] for f in corpus.flags if f["status"] == "ACTIVE"]
    assert sorted(ours) == sorted(active)
    mismatches = []
    compared = 0
    for matching, bucketing, attrs in corpus.keys:
        ctx = client._context_factory.context_for(matching, names)
        results = client._evaluator.eval_many_with_context(matching, bucketing, names, attrs, ctx)
        for name in names:
            expected = results[name]
            if name not in ours:
                assert expected["treatment"] == "control"
                continue
            served, label = _ours(ours[name], matching, bucketing, attrs)
            compared += 1
            same = (
                served.value == expected["treatment"]
                and label == expected["impression"]["label"]
                and _same_config(expected["configurations"], served.config, served.has_config)
            )
            if not same:
                mismatches.append((name, matching, bucketing, attrs, expected, served, label))
    assert compared == len(active) * len(corpus.keys)
    assert not mismatches, f"{len(mismatches)} of {compared} differ; first: {mismatches[:3]}"


def test_localhost_oracle_public_api(localhost_corpus: tuple[Corpus, Any, dict[str, Any]]) -> None:
    """The public client (input validation, get_treatments_with_config) agrees on a slice of keys."""
    corpus, client, ours = localhost_corpus
    names = [f["name"] for f in corpus.flags]
    mismatches = []
    for matching, bucketing, attrs in corpus.keys[:40]:
        key = matching if bucketing is None else Key(matching, bucketing)
        results = client.get_treatments_with_config(key, names, attrs)
        for name in names:
            treatment, config = results[name]
            flag = ours.get(name)
            if flag is None:
                same = treatment == "control" and config is None
            else:
                served = flag.evaluate(_context(matching, bucketing, attrs))
                same = served.value == treatment and _same_config(config, served.config, served.has_config)
            if not same:
                mismatches.append((name, matching, bucketing, treatment, config))
    assert not mismatches, mismatches[:5]


def test_localhost_oracle_covers_the_grammar(localhost_corpus: tuple[Corpus, Any, dict[str, Any]]) -> None:
    """The corpus really exercises what it claims to (so zero mismatches means something)."""
    corpus, _, ours = localhost_corpus
    kinds = {
        m["matcherType"]
        for f in corpus.flags + corpus.rbs
        for c in f["conditions"]
        for m in c["matcherGroup"]["matchers"]
    }
    supported = {*SUPPORTED_MATCHERS, "IN_LARGE_SEGMENT"}
    assert supported <= kinds
    labels: dict[str, int] = {}
    for matching, bucketing, attrs in corpus.keys:
        for flag in ours.values():
            reason = _ours(flag, matching, bucketing, attrs)[1]
            labels[reason] = labels.get(reason, 0) + 1
    for label in ("killed", "default rule", "not in split", "prerequisites not met", "rule 0", "rule 1"):
        assert labels.get(label, 0) > 20, labels
    assert labels.get("targeting rule type unsupported by sdk", 0) > 0, labels
    assert sum(1 for _, b, _ in corpus.keys if b is not None) > 50


# --- raw-definition oracle (the SDK evaluator without localhost sanitisation) ----------------------


def _sdk_raw_evaluator(corpus: Corpus) -> tuple[Evaluator, dict[str, Any], dict[str, Any]]:
    flags = {}
    for raw in copy.deepcopy(corpus.flags):
        model = sdk_splits.from_raw(raw)
        if model.status == sdk_splits.Status.ACTIVE:
            flags[model.name] = model
    rbs = {}
    for raw in copy.deepcopy(corpus.rbs):
        model = sdk_rbs.from_raw(raw)
        if model.status == sdk_splits.Status.ACTIVE:
            rbs[model.name] = model
    return Evaluator(Splitter(), FallbackTreatmentCalculator(None)), flags, rbs


@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2, SEED + 3])
def test_raw_definitions_oracle(seed: int) -> None:
    corpus = Corpus(seed, flags=200, keys=200, raw_mode=True)
    evaluator, sdk_flags, sdk_rbs_models = _sdk_raw_evaluator(corpus)
    segments = {name: set(members) for name, members in corpus.segments.items()}
    problems: dict[str, str] = {}
    ours = compile_split(
        {f["name"]: f for f in copy.deepcopy(corpus.flags)},
        segments,
        {r["name"]: r for r in corpus.rbs},
        problems,
    )
    assert problems == {}
    assert sorted(ours) == sorted(sdk_flags)
    assert any(f.get("algo") == 1 for f in corpus.flags)
    mismatches = []
    outcomes: dict[str, int] = {}
    for matching, bucketing, attrs in corpus.keys:
        memberships = {name: matching in segments.get(name, ()) for name in SEGMENT_NAMES}
        ctx = EvaluationContext(sdk_flags, memberships, sdk_rbs_models)
        for name in sdk_flags:
            try:
                result = evaluator.eval_with_context(matching, bucketing, name, attrs, ctx)
                expected = (result["treatment"], result["configurations"], result["impression"]["label"])
            except Exception:  # get_treatment answers control
                expected = ("control", None, "exception")
            served, label = _ours(ours[name], matching, bucketing, attrs)
            outcomes[expected[2]] = outcomes.get(expected[2], 0) + 1
            same = (
                served.value == expected[0]
                and label == expected[2]
                and _same_config(expected[1], served.config, served.has_config)
            )
            if not same:
                mismatches.append((name, matching, bucketing, attrs, expected, served, label))
    assert outcomes.get("exception", 0) > 0, outcomes
    assert not mismatches, f"{len(mismatches)} differ; first: {mismatches[:3]}"


# --- hashing and versions against the SDK's own functions ------------------------------------------

_SEEDS = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**32, 2**40 + 5, -(2**45)]),
)
_KEYS = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(key=_KEYS, seed=_SEEDS)
def test_legacy_hash_matches_sdk(key: str, seed: int) -> None:
    assert legacy_hash(key, seed) == sdk_legacy_hash(key, seed)
    assert bucket(key, seed, 1) == Splitter.get_bucket(key, seed, sdk_splits.HashAlgorithm.LEGACY)


@settings(max_examples=400, deadline=None)
@given(key=_KEYS, seed=_SEEDS)
def test_murmur_hash_matches_sdk(key: str, seed: int) -> None:
    assert murmur_hash(key, seed) == murmur32_py(key, seed)
    assert bucket(key, seed, 2) == Splitter.get_bucket(key, seed, sdk_splits.HashAlgorithm.MURMUR)


def test_legacy_hash_seeded_sweep_matches_sdk() -> None:
    rng = random.Random(SEED)
    for _ in range(3000):
        key = "".join(rng.choices(string.printable + "éßЖ中😀", k=rng.randint(0, 80)))
        seed = rng.randint(-(2**33), 2**33)
        assert legacy_hash(key, seed) == sdk_legacy_hash(key, seed), (key, seed)


_VERSION_TEXT = st.text(alphabet="0123456789.-+abvx²", max_size=14)


@settings(max_examples=1500, deadline=None)
@given(a=_VERSION_TEXT, b=_VERSION_TEXT)
def test_semver_parse_and_order_match_sdk(a: str, b: str) -> None:
    for text in (a, b):
        sdk = build_semver_or_none(text)
        mine = parse_semver(text)
        assert (sdk is None) == (mine is None), text
        if sdk is not None and mine is not None:
            assert sdk.version == mine.version
    sa, sb, ma, mb = build_semver_or_none(a), build_semver_or_none(b), parse_semver(a), parse_semver(b)
    if sa is not None and sb is not None and ma is not None and mb is not None:
        assert compare_semver(ma, mb) == sa.compare(sb)
