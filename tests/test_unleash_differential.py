"""proxy/sources/unleash/ against the real SDK, ``UnleashClient`` 6.9.1 (its Yggdrasil engine), offline.

Generated features x contexts (tests/unleash_corpus.py) go to both; every pair must agree on
``is_enabled`` and on the whole ``get_variant`` answer (name, payload, enabled, feature_enabled),
with zero mismatches. ``make test`` runs a small corpus; ``make test-slow`` runs ≥ 100,000 pairs
over several seeds (set UNLEASH_DIFFERENTIAL_SEED to explore others).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from support import quiet_loggers

pytest.importorskip(
    "UnleashClient",
    reason="UnleashClient (Unleash's Python SDK) is not installed: pip install UnleashClient==6.9.1",
)

from unleash_corpus import OPERATORS, STRATEGIES, Corpus, Oracle

from proxy.sources.unleash import CONTEXT_KEY, compile_features, from_sdk_context, parse_features

SEED = int(os.environ.get("UNLEASH_DIFFERENTIAL_SEED", "20261201"))


@pytest.fixture(autouse=True, scope="module")
def _quiet_loggers() -> Iterator[None]:
    """The corpus' deliberate breakage logs a warning per feature."""
    with quiet_loggers("proxy.sources.unleash", "UnleashClient", "yggdrasil_engine"):
        yield


def _ours(served: Any) -> dict[str, Any]:
    resolved = isinstance(served.value, str)
    variant: dict[str, Any] = {"name": served.variant, "enabled": resolved, "feature_enabled": served.enabled}
    if served.payload is not None:
        variant["payload"] = dict(served.payload)
    return {"enabled": served.enabled, "variant": variant}


def compare(corpus: Corpus) -> tuple[int, list[str], Any]:
    """→ (pairs compared, mismatch descriptions, outcome counts)."""
    features, segments = parse_features(corpus.body)
    problems: dict[str, str] = {}
    flags, _ = compile_features(features, segments, problems)
    assert not problems, problems
    oracle = Oracle(corpus.body)
    mismatches: list[str] = []
    outcomes = {"enabled": 0, "disabled": 0, "variant": 0, "payload": 0}
    pairs = 0
    try:
        for context in corpus.contexts:
            ours_context = {CONTEXT_KEY: from_sdk_context(context)}
            for feature in corpus.features:
                name = feature["name"]
                expected = oracle.answer(name, context)
                got = _ours(flags[name].evaluate(ours_context))
                pairs += 1
                outcomes["enabled" if expected["enabled"] else "disabled"] += 1
                outcomes["variant"] += expected["variant"]["enabled"]
                outcomes["payload"] += "payload" in expected["variant"]
                if got != expected and len(mismatches) < 20:
                    mismatches.append(f"{name} {context}: sdk {expected} ours {got}\n  feature: {feature}")
    finally:
        oracle.close()
    return pairs, mismatches, outcomes


def _check(corpus: Corpus, pairs: int, mismatches: list[str], outcomes: dict[str, int]) -> None:
    assert not mismatches, "\n".join(mismatches)
    for name in (*OPERATORS, *STRATEGIES):
        assert corpus.used[name] > 0, f"the corpus never used {name}"
    assert all(outcomes.values()), outcomes  # on, off, variants and payloads all happened


def test_differential_small_corpus() -> None:
    corpus = Corpus(SEED, features=100, contexts=100)
    pairs, mismatches, outcomes = compare(corpus)
    assert pairs == 10000
    _check(corpus, pairs, mismatches, outcomes)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("offset", range(5))
def test_differential_large_corpus(offset: int) -> None:
    corpus = Corpus(SEED + 1 + offset, features=100, contexts=210)
    pairs, mismatches, outcomes = compare(corpus)
    assert pairs == 21000  # 5 seeds: 105,000 pairs
    _check(corpus, pairs, mismatches, outcomes)
