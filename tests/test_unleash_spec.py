"""Unleash's client specification v6.1.0 (Apache-2.0): all 279 cases through proxy/sources/unleash/.

The suite is not vendored: ``make test`` installs the npm package ``@unleash/client-specification``
at 6.1.0 (pinned with its integrity hash by tests/unleash_spec/package-lock.json; the same files as
the git tag v6.1.0, commit 931b695b2a9911e1ab46a03516566e8da09dd6ec) into
tests/unleash_spec/node_modules. Each ``tests`` case checks ``is_enabled``; each ``variantTests``
case checks the whole ``get_variant`` answer (name, payload, enabled, feature_enabled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.sources.unleash import CONTEXT_KEY, compile_features, from_sdk_context, parse_features

SPEC_DIR = Path(__file__).parent / "unleash_spec" / "node_modules" / "@unleash" / "client-specification"
EXPECTED_CASES = 279


def _spec_files() -> list[Path]:
    index = SPEC_DIR / "specifications" / "index.json"
    if not index.is_file():
        message = f"{SPEC_DIR} is missing: run make unleash-spec (npm ci in tests/unleash_spec)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return [SPEC_DIR / "specifications" / name for name in json.loads(index.read_text())]


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    index = SPEC_DIR / "specifications" / "index.json"
    if not index.is_file():
        return []
    out = []
    for name in json.loads(index.read_text()):
        suite = json.loads((SPEC_DIR / "specifications" / name).read_text())
        for kind in ("tests", "variantTests"):
            for i, case in enumerate(suite.get(kind, [])):
                out.append((name, kind, {**case, "index": i}))
    return out


CASES = _cases()


def test_the_whole_suite_is_there() -> None:
    files = _spec_files()
    assert len(files) == 22
    assert len(CASES) == EXPECTED_CASES
    package = json.loads((SPEC_DIR / "package.json").read_text())
    assert package["version"] == "6.1.0" and package["license"] == "Apache-2.0"
    assert (SPEC_DIR / "LICENSE").is_file()


_compiled: dict[str, Any] = {}


def _flags(name: str) -> Any:
    if name not in _compiled:
        suite = json.loads((SPEC_DIR / "specifications" / name).read_text())
        features, segments = parse_features(suite["state"])
        problems: dict[str, str] = {}
        flags, _ = compile_features(features, segments, problems)
        assert not problems, problems
        _compiled[name] = flags
    return _compiled[name]


@pytest.mark.parametrize(
    ("spec", "kind", "case"),
    CASES,
    ids=[f"{spec[:2]}-{kind}-{case['index']}" for spec, kind, case in CASES],
)
def test_specification_case(spec: str, kind: str, case: dict[str, Any]) -> None:
    flag = _flags(spec).get(case["toggleName"])
    served = flag.evaluate({CONTEXT_KEY: from_sdk_context(case["context"])}) if flag else None
    expected = case["expectedResult"]
    if kind == "tests":
        assert (served is not None and served.enabled) is expected, case["description"]
        return
    got: dict[str, Any] = {"name": "disabled", "enabled": False, "feature_enabled": False}
    if served is not None:
        resolved = isinstance(served.value, str)  # a variant, not the on/off outcomes
        got = {"name": served.variant, "enabled": resolved, "feature_enabled": served.enabled}
        if served.payload is not None:
            got["payload"] = dict(served.payload)
    assert got == {"feature_enabled": got["feature_enabled"], **expected}, case["description"]
