"""Unleash evaluation speed: flagproxy's compiled Unleash features vs Unleash's Python SDK.

    .venv/bin/python bench/unleash_vs_sdk.py [--features 50] [--contexts 5000] [--seed 7]

The same generated ``/api/client/features`` body (segments, constraints of every family, strategy
and feature variants, a dependency) is evaluated for every context, all features per context:

* flagproxy, as the proxy evaluates: the request context (``make_context(key, attributes)``) and
  ``flag.evaluate(context)`` for every feature (the Unleash context is built once per request);
* ``UnleashClient`` 6.9.1 (its Yggdrasil engine), bootstrapped offline: ``is_enabled`` then
  ``get_variant`` for every feature — what an application calls to get what the header carries.

Answers are compared along the way (a benchmark of wrong answers would be meaningless). Prints a
markdown table of features evaluated per second and the flagproxy/SDK ratio (target: at least
10x). Needs ``pip install UnleashClient==6.9.1`` (in the test extras); not part of the test suite.
"""

from __future__ import annotations

import argparse
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
from proxy.sources.unleash import compile_features, parse_features


def generate(n: int, rng: random.Random) -> dict[str, Any]:
    segments = [
        {
            "id": 1,
            "constraints": [{"contextName": "country", "operator": "IN", "values": ["no", "se", "dk"]}],
        },
        {"id": 2, "constraints": [{"contextName": "plan", "operator": "NOT_IN", "values": ["free"]}]},
    ]
    constraints = [
        {
            "contextName": "email",
            "operator": "STR_ENDS_WITH",
            "values": ["@acme.com"],
            "caseInsensitive": True,
        },
        {"contextName": "age", "operator": "NUM_GTE", "value": "18"},
        {"contextName": "version", "operator": "SEMVER_GTE", "value": "2.1.0"},
        {"contextName": "currentTime", "operator": "DATE_AFTER", "value": "2024-01-01T00:00:00Z"},
        {"contextName": "email", "operator": "REGEX", "value": "^[a-z]+[0-9]*@"},
        {"contextName": "plan", "operator": "IN", "values": ["pro", "enterprise"], "inverted": True},
    ]
    features = []
    for i in range(n):
        style = i % 5
        strategy: dict[str, Any] = {
            "name": "flexibleRollout",
            "parameters": {
                "rollout": str(rng.choice([10, 25, 50, 100])),
                "stickiness": "default",
                "groupId": f"f{i}",
            },
            "constraints": rng.sample(constraints, k=rng.randint(0, 2)),
        }
        if style == 1:
            strategy["segments"] = [rng.choice([1, 2])]
        if style == 2:
            strategy["variants"] = [
                {"name": "a", "weight": 500, "payload": {"type": "json", "value": '{"x": 1}'}},
                {"name": "b", "weight": 500},
            ]
        strategies = [{"name": "userWithId", "parameters": {"userIds": "u1,u2,u3"}}, strategy]
        feature: dict[str, Any] = {
            "name": f"feature_{i:02d}",
            "enabled": i % 13 != 12,
            "strategies": strategies,
        }
        if style == 3:
            feature["variants"] = [
                {"name": "blue", "weight": 600, "stickiness": "default"},
                {
                    "name": "green",
                    "weight": 400,
                    "stickiness": "default",
                    "payload": {"type": "string", "value": "g"},
                },
            ]
        if style == 4 and features:
            feature["dependencies"] = [{"feature": features[-2]["name"]}]
        features.append(feature)
    return {"version": 2, "features": features, "segments": segments}


def contexts(n: int, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i in range(n):
        attributes = {
            "country": rng.choice(["no", "se", "us", "de"]),
            "plan": rng.choice(["free", "pro", "enterprise"]),
            "email": rng.choice([f"user{i}@acme.com", f"x{i}@example.org"]),
            "age": str(rng.randint(10, 70)),
            "version": rng.choice(["1.9.0", "2.1.0", "2.3.1", "3.0.0-beta.1"]),
        }
        out.append((f"user-{i}", attributes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--contexts", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rng = random.Random(args.seed)
    body = generate(args.features, rng)
    inputs = contexts(args.contexts, rng)
    now = "2026-06-01T00:00:00+00:00"

    features, segments = parse_features(body)
    flags = list(compile_features(features, segments)[0].values())

    from UnleashClient import UnleashClient
    from UnleashClient.cache import FileCache
    from UnleashClient.utils import InstanceAllowType

    with tempfile.TemporaryDirectory() as directory:
        cache = FileCache("flagproxy-bench", directory=directory)
        cache.bootstrap_from_dict(body)
        client = UnleashClient(
            url="http://127.0.0.1:9",  # never contacted
            app_name="flagproxy-bench",
            disable_metrics=True,
            disable_registration=True,
            cache=cache,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
        )
        client.unleash_static_context = {}
        names = [f.key for f in flags]

        started = time.perf_counter()
        ours = []
        for key, attributes in inputs:
            ctx = make_context(key, {**attributes, "currentTime": now})
            ours.append([flag.evaluate(ctx) for flag in flags])
        ours_s = time.perf_counter() - started

        started = time.perf_counter()
        theirs = []
        for key, attributes in inputs:
            context = {"userId": key, "currentTime": now, "properties": attributes}
            theirs.append([(client.is_enabled(n, context), client.get_variant(n, context)) for n in names])
        sdk_s = time.perf_counter() - started
        client.destroy()

    for served_row, sdk_row in zip(ours, theirs, strict=True):
        for served, (enabled, variant) in zip(served_row, sdk_row, strict=True):
            assert served.enabled is enabled and served.variant == variant["name"], (served, enabled, variant)

    evaluations = args.features * args.contexts
    ours_rate, sdk_rate = evaluations / ours_s, evaluations / sdk_s
    print(
        f"{args.features} features x {args.contexts} contexts, all answers equal; "
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}\n"
    )
    print("| evaluator | features/s | per request (all features) |")
    print("|---|---:|---:|")
    print(f"| flagproxy (`flag.evaluate`) | {ours_rate:,.0f} | {ours_s / args.contexts * 1e6:,.0f} µs |")
    print(
        f"| UnleashClient 6.9.1 (`is_enabled` + `get_variant`) | {sdk_rate:,.0f} | "
        f"{sdk_s / args.contexts * 1e6:,.0f} µs |"
    )
    print(f"\nflagproxy / SDK: {ours_rate / sdk_rate:.1f}x (target: at least 10x)")


if __name__ == "__main__":
    main()
