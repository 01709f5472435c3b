"""Split evaluation speed: flagproxy's compiled Split flags vs the official Python SDK.

    .venv/bin/python bench/split_vs_sdk.py [--flags 50] [--keys 10000] [--seed 7]

The same generated splitChanges (spec 1.3, with segments and a rule-based segment) is evaluated for
every key with attributes, all flags per key:

* flagproxy: ``DEFAULT.load_file("split", ...)`` then ``flag.evaluate(context)`` for every flag (the context
  is built per key, as ``flagproxy eval`` does);
* splitio-client 10.7.0, localhost JSON mode: ``client.get_treatments(key, names, attributes)`` — the
  public call an application makes (input validation, evaluation, impressions, telemetry);
* the SDK's evaluator alone (``context_for`` + ``eval_many_with_context``), for reference.

Treatments are compared along the way (a benchmark of wrong answers would be meaningless). Prints a
markdown table of evaluations per second and the flagproxy/SDK ratio (target: at least 10x). Needs
``pip install splitio-client==10.7.0``; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.dataplane.context import make_context
from proxy.sources.registry import DEFAULT

TREATMENTS = ["on", "off", "v1", "v2"]
SEGMENTS = ("beta_users", "employees")


def _m(kind: str, attribute: str | None = None, negate: bool = False, **data: Any) -> dict[str, Any]:
    return {
        "keySelector": {"trafficType": "user", "attribute": attribute},
        "matcherType": kind,
        "negate": negate,
        **data,
    }


def _cond(
    kind: str, label: str, matchers: list[dict[str, Any]], parts: list[tuple[str, int]]
) -> dict[str, Any]:
    return {
        "conditionType": kind,
        "label": label,
        "matcherGroup": {"combiner": "AND", "matchers": matchers},
        "partitions": [{"treatment": t, "size": s} for t, s in parts],
    }


def generate(n_flags: int, keys: list[str], rng: random.Random) -> dict[str, Any]:
    """A realistic mix: whitelists, segments, attribute targeting, dependencies, rollouts."""
    flags = []
    for i in range(n_flags):
        t = rng.sample(TREATMENTS, k=rng.randint(2, 3))
        conditions = [
            _cond("WHITELIST", "whitelisted", [_m("WHITELIST", whitelistMatcherData={
                "whitelist": rng.sample(keys[:500], k=5)})], [(t[0], 100)]),
        ]  # fmt: skip
        style = i % 5
        if style == 1:
            conditions.append(
                _cond("ROLLOUT", "in segment", [_m("IN_SEGMENT", userDefinedSegmentMatcherData={
                    "segmentName": rng.choice(SEGMENTS)})], [(t[0], 50), (t[1], 50)])
            )  # fmt: skip
        elif style == 2:
            conditions.append(
                _cond("ROLLOUT", "pro adults", [
                    _m("GREATER_THAN_OR_EQUAL_TO", "age",
                       unaryNumericMatcherData={"dataType": "NUMBER", "value": 18}),
                    _m("PART_OF_SET", "plan", whitelistMatcherData={"whitelist": ["pro", "enterprise"]}),
                ], [(t[1], 100)])
            )  # fmt: skip
        elif style == 3:
            conditions.append(
                _cond("ROLLOUT", "new app", [_m("GREATER_THAN_OR_EQUAL_TO_SEMVER", "version",
                                                stringMatcherData="2.1.0")], [(t[0], 30), (t[1], 70)])
            )  # fmt: skip
        elif style == 4 and flags:
            conditions.append(
                _cond("ROLLOUT", "depends", [_m("IN_SPLIT_TREATMENT", dependencyMatcherData={
                    "split": flags[-1]["name"], "treatments": ["on", "v1"]})], [(t[1], 100)])
            )  # fmt: skip
        else:
            rbs = _m("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "power_users"})
            conditions.append(_cond("ROLLOUT", "in power users", [rbs], [(t[0], 100)]))
        rollout = [(t[0], 34), (t[1], 33), (t[-1], 33)] if len(t) == 3 else [(t[0], 50), (t[1], 50)]
        conditions.append(_cond("ROLLOUT", "default rule", [_m("ALL_KEYS")], rollout))
        flags.append(
            {
                "name": f"flag_{i:02d}",
                "trafficTypeName": "user",
                "trafficAllocation": 100 if i % 4 else 80,
                "trafficAllocationSeed": rng.randint(1, 2**31 - 1),
                "seed": rng.randint(-(2**31), -1),
                "status": "ACTIVE",
                "killed": i % 17 == 16,
                "defaultTreatment": "off",
                "changeNumber": 1_700_000_000_000 + i,
                "algo": 2,
                "conditions": conditions,
                "configurations": {t[0]: json.dumps({"variant": t[0], "limit": i})},
            }
        )
    power = {
        "name": "power_users",
        "trafficTypeName": "user",
        "changeNumber": 5,
        "status": "ACTIVE",
        "excluded": {"keys": keys[:3], "segments": [{"name": "employees", "type": "standard"}]},
        "conditions": [
            {
                "conditionType": "ROLLOUT",
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [
                        _m("ALL_KEYS"),
                        _m("GREATER_THAN_OR_EQUAL_TO", "logins", unaryNumericMatcherData={
                            "dataType": "NUMBER", "value": 50}),
                    ],
                },
            }
        ],
    }  # fmt: skip
    return {"ff": {"d": flags, "s": -1, "t": 1_800_000_000_000}, "rbs": {"d": [power], "s": -1, "t": 10}}


def attributes(rng: random.Random) -> dict[str, Any]:
    return {
        "age": rng.randint(10, 70),
        "plan": rng.choice(["free", "pro", "enterprise"]),
        "version": rng.choice(["1.9.0", "2.0.5", "2.1.0", "2.2.0-beta.1", "3.0.0"]),
        "logins": rng.randint(0, 100),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", type=int, default=50)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    try:
        from splitio import get_factory
    except ImportError:
        print("splitio-client is not installed: pip install splitio-client==10.7.0", file=sys.stderr)
        return 2
    logging.getLogger("splitio").setLevel(logging.CRITICAL)

    rng = random.Random(args.seed)
    keys = [f"user-{i}-{rng.randrange(10**6)}" for i in range(args.keys)]
    people = [(k, attributes(rng)) for k in keys]
    document = generate(args.flags, keys, rng)
    names = [f["name"] for f in document["ff"]["d"]]
    pairs = len(people) * len(names)

    with tempfile.TemporaryDirectory() as tmp:
        flags_file = Path(tmp) / "splits.json"
        flags_file.write_text(json.dumps(document))
        segments = Path(tmp) / "segments"
        segments.mkdir()
        for name in SEGMENTS:
            members = rng.sample(keys, k=len(keys) // 10)
            (segments / f"{name}.json").write_text(
                json.dumps({"name": name, "added": members, "removed": [], "since": -1, "till": 1})
            )

        compiled = DEFAULT.load_file("split", flags_file, segments)
        ordered = [compiled[n] for n in names]
        started = time.perf_counter()
        ours = []
        for key, attrs in people:
            context = make_context(key, attrs)
            ours.append([flag.evaluate(context).value for flag in ordered])
        ours_seconds = time.perf_counter() - started

        factory = get_factory(
            "localhost",
            config={
                "splitFile": str(flags_file),
                "segmentDirectory": str(segments),
                "localhostRefreshEnabled": False,
            },
        )
        factory.block_until_ready(10)
        client = factory.client()
        started = time.perf_counter()
        sdk = []
        for key, attrs in people:
            result = client.get_treatments(key, names, attrs)
            sdk.append([result[n] for n in names])
        sdk_seconds = time.perf_counter() - started

        started = time.perf_counter()
        for key, attrs in people:
            ctx = client._context_factory.context_for(key, names)
            client._evaluator.eval_many_with_context(key, None, names, attrs, ctx)
        evaluator_seconds = time.perf_counter() - started
        factory.destroy()

    mismatches = sum(
        a != b for row_a, row_b in zip(ours, sdk, strict=True) for a, b in zip(row_a, row_b, strict=True)
    )
    ours_rate, sdk_rate, evaluator_rate = pairs / ours_seconds, pairs / sdk_seconds, pairs / evaluator_seconds
    print(f"{len(names)} Split flags x {len(people)} keys = {pairs:,} evaluations")
    print(f"python {platform.python_version()} on {platform.machine()}; treatment mismatches: {mismatches}\n")
    print("| evaluator | seconds | evaluations/s | flagproxy speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| flagproxy compiled Split flags | {ours_seconds:.2f} | {ours_rate:,.0f} | 1.0x |")
    speedup = ours_rate / sdk_rate
    print(
        f"| splitio-client 10.7.0 `get_treatments` | {sdk_seconds:.2f} | {sdk_rate:,.0f} | {speedup:.1f}x |"
    )
    print(
        f"| splitio-client evaluator only (no impressions) | {evaluator_seconds:.2f} | {evaluator_rate:,.0f} "
        f"| {ours_rate / evaluator_rate:.1f}x |"
    )
    target = speedup >= 10
    print(f"\ntarget >= 10x over get_treatments: {'met' if target else 'NOT met'}")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
