"""Engine speed: resolve 50 flags (20 boolean, 20 weighted, 10 with 3-rule targeting) for one context.

    python bench/engine.py [--rounds 2000] [--json FILE]

Reports the median and p99 time of (a) evaluating the 50 compiled flags, (b) the whole per-request
resolve (context from the ASGI scope + evaluation + header encoding), and (c) `flagproxy eval`
batch throughput in keyxflag pairs per second. Target: (a) median ≤ 40 µs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.cli.evaluate import evaluate_lines
from proxy.config import load_settings
from proxy.dataplane.context import ContextBuilder
from proxy.dataplane.resolver import FlagResolver
from proxy.engine import compile_document
from proxy.sources.native.document import seed_state
from proxy.sources.registry import DEFAULT
from proxy.store import MemoryStore


def fifty_flags() -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for i in range(20):
        flags[f"bool-{i:02d}"] = {"percentage": 5 * (i + 1)} if i % 2 else {"enabled": i % 4 != 0}
    for i in range(20):
        flags[f"weighted-{i:02d}"] = {
            "variants": {
                "control": {"weight": 50, "config": {"threshold": 0.85, "window": 300}},
                "treatment_a": {"weight": 25, "config": {"threshold": 0.75, "window": 180}},
                "treatment_b": {"weight": 25, "config": {"threshold": 0.80, "window": 120}},
            },
            "defaultVariant": "control",
        }
    for i in range(10):
        flags[f"targeted-{i:02d}"] = {
            "variants": {"off": {"weight": 90}, "on": {"weight": 10}, "beta": {"weight": 0}},
            "defaultVariant": "off",
            "rules": [
                {"if": {"in": [{"var": "country"}, ["NZ", "AU", "CA"]]}, "variant": "beta"},
                {"if": {"sem_ver": [{"var": "version"}, ">=", "3.0.0"]}, "rollout": {"on": 1, "off": 1}},
                {
                    "if": {"and": [{"==": [{"var": "plan"}, "pro"]}, {">": [{"var": "age"}, 30]}]},
                    "variant": "on",
                },
            ],
        }
    return {"flags": flags}


def timed(fn: Any, rounds: int, inner: int = 20) -> list[float]:
    """Per-call times in µs: ``rounds`` samples, each the mean of ``inner`` calls."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - start) / inner / 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered), 2),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=10_000, help="keys for the batch eval measurement")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    document = fifty_flags()
    flags = compile_document(document)
    ordered = [flags[k] for k in sorted(flags)]
    context = {
        "key": "user-1234",
        "country": "US",
        "version": "2.4.1",
        "plan": "pro",
        "age": 31,
        "path": "/api/x",
    }

    def evaluate_only() -> None:
        for f in ordered:
            f.evaluate(context)

    settings = load_settings(env={})
    store = MemoryStore(seed_state(document), compiler=DEFAULT)
    resolver = FlagResolver(store, ContextBuilder(settings.context))
    scope = {
        "type": "http",
        "path": "/api/x",
        "method": "GET",
        "query_string": b"",
        "headers": [
            (b"host", b"api.example"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            (b"x-user-id", b"user-1234"),
            (b"x-country", b"US"),
        ],
    }

    def resolve() -> None:
        resolver.resolve(scope)

    for fn in (evaluate_only, resolve):  # warm up
        timed(fn, 200)
    results: dict[str, Any] = {
        "flags": len(ordered),
        "evaluate_50": summary(timed(evaluate_only, args.rounds)),
        "resolve_request_50": summary(timed(resolve, args.rounds)),
    }

    lines = [
        json.dumps({"key": f"user-{i}", "attributes": {"country": "NZ" if i % 7 == 0 else "US"}})
        for i in range(args.keys)
    ]
    start = time.perf_counter()
    count = sum(1 for _ in evaluate_lines(ordered, lines))
    elapsed = time.perf_counter() - start
    results["eval_batch"] = {
        "keys": count,
        "pairs_per_s": round(count * len(ordered) / elapsed),
        "seconds": round(elapsed, 3),
    }

    print("| measurement | median µs | p99 µs |")
    print("|---|---:|---:|")
    for name in ("evaluate_50", "resolve_request_50"):
        print(f"| {name} | {results[name]['median_us']} | {results[name]['p99_us']} |")
    batch = results["eval_batch"]
    print(
        f"\neval batch: {batch['keys']} keys x {len(ordered)} flags in {batch['seconds']} s "
        f"= {batch['pairs_per_s']:,} keyxflag pairs/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
