"""The real OpenFeature Python client (``openfeature-sdk`` with ``openfeature-provider-ofrep``)
against the proxy's OFREP endpoints: every flag and context equals ``flagproxy eval``; errors,
back-off on 429, and exposures of experiment flags."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from support import REPO, ProxyProcess, RawOrigin

KEY = "python-key-0123456789ab"
ADMIN = "admin-token-0123456789"
FLAGS: dict[str, Any] = {
    "flags": {
        "checkout": {
            "variants": {
                "control": {"weight": 34},
                "one-page": {"weight": 33, "config": {"steps": 1, "label": "Pay ✓"}},
                "wizard": {"weight": 33, "config": {"steps": 4}},
            },
            "defaultVariant": "control",
            "rules": [
                {"if": {"==": [{"var": "plan"}, "pro"]}, "variant": "wizard"},
                {"if": {"in": [{"var": "country"}, ["NZ", "AU"]]}, "variant": "one-page"},
            ],
        },
        "dark-mode": {"rules": [{"if": {"==": [{"var": "country"}, "FR"]}, "value": False}]},
        "beta": {"percentage": 30},
        "retired": {"enabled": False},
        "theme": {"variants": {"light": {"weight": 1}, "dark": {"weight": 1}}, "defaultVariant": "light"},
        "price": {
            "variants": {"low": {"weight": 1}, "high": {"weight": 1}},
            "defaultVariant": "low",
            "experiment": {"goals": ["buy"]},
        },
    }
}
CONTEXTS: list[dict[str, Any]] = [
    {"targetingKey": f"user-{i}", **attrs}
    for i, attrs in enumerate(
        [{}, {"country": "NZ"}, {"plan": "pro"}, {"country": "FR"}, {"country": "AU", "plan": "free"}] * 6
    )
]
CONFIG = f"""
[admin]
token = "{ADMIN}"
[[client_keys]]
name = "python"
key = "{KEY}"
[[goals]]
name = "buy"
path = "/buy"
"""


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    return proxy_factory([origin.url], config=CONFIG, flags=FLAGS)


_domains = itertools.count()


def openfeature_client(base_url: str, key: str = KEY) -> OpenFeatureClient:
    """A client of its own domain, with the real OFREP provider pointed at ``{base}/__flags``."""
    domain = f"flagproxy-{next(_domains)}"
    provider = OFREPProvider(
        f"{base_url}/__flags", headers_factory=lambda: {"Authorization": f"Bearer {key}"}
    )
    api.set_provider(provider, domain=domain)
    return api.get_client(domain)


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> Iterator[OpenFeatureClient]:
    yield openfeature_client(proxy.base_url)
    api.shutdown()


def flagproxy_eval(contexts: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    flags = tmp / "flags.json"
    flags.write_text(json.dumps(FLAGS))
    lines = [
        json.dumps(
            {"key": c["targetingKey"], "attributes": {k: v for k, v in c.items() if k != "targetingKey"}}
        )
        for c in contexts
    ]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "eval", "--flags", str(flags), "--keys-file", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    return [json.loads(line)["flags"] for line in result.stdout.splitlines()]


def expected_value(flag: str, variant: Any) -> Any:
    """What the value mapping gives for the variant ``flagproxy eval`` names."""
    if isinstance(variant, bool):
        return variant
    spec = FLAGS["flags"][flag]["variants"][variant]
    return spec.get("config", variant)


def details(client: OpenFeatureClient, flag: str, expected: Any, context: EvaluationContext) -> Any:
    if isinstance(expected, bool):
        return client.get_boolean_details(flag, not expected, context)
    if isinstance(expected, dict):
        return client.get_object_details(flag, {}, context)
    return client.get_string_details(flag, "code-default", context)


def test_the_python_provider_equals_flagproxy_eval_over_flags_and_contexts(
    client: OpenFeatureClient, tmp_path: Path
) -> None:
    wanted = flagproxy_eval(CONTEXTS, tmp_path)
    checked = 0
    for context, values in zip(CONTEXTS, wanted, strict=True):
        ctx = EvaluationContext(
            targeting_key=context["targetingKey"],
            attributes={k: v for k, v in context.items() if k != "targetingKey"},
        )
        assert set(values) == set(FLAGS["flags"])
        for flag, variant in values.items():
            value = expected_value(flag, variant)
            got = details(client, flag, value, ctx)
            assert got.error_code is None, (flag, context, got.error_message)
            assert got.value == value, (flag, context)
            assert got.variant == (("true" if variant else "false") if isinstance(variant, bool) else variant)
            assert got.reason in {r.value for r in Reason}
            checked += 1
    assert checked == len(CONTEXTS) * len(FLAGS["flags"])


def test_reasons_the_provider_reports(client: OpenFeatureClient) -> None:
    nz = EvaluationContext(targeting_key="u1", attributes={"country": "NZ"})
    assert client.get_object_details("checkout", {}, nz).reason == Reason.TARGETING_MATCH
    assert client.get_boolean_details("retired", True, nz).reason == Reason.DISABLED
    assert client.get_string_details("theme", "", nz).reason == Reason.SPLIT
    assert client.get_boolean_details("beta", True, nz).reason == Reason.SPLIT


def test_errors_reach_the_application_as_defaults_with_their_codes(
    client: OpenFeatureClient, proxy: ProxyProcess
) -> None:
    missing = client.get_boolean_details("no-such-flag", True, EvaluationContext(targeting_key="u"))
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    assert "not found" in (missing.error_message or "")
    # the SDK sends {"context": {}} when the application set none: flags that bucket need the key
    no_unit = client.get_string_details("theme", "code-default")
    assert (no_unit.value, no_unit.error_code) == ("code-default", ErrorCode.TARGETING_KEY_MISSING)
    assert client.get_boolean_details("dark-mode", False).value is True  # nothing to bucket
    stranger = openfeature_client(proxy.base_url, key="not-the-key-0123456789")
    refused = stranger.get_boolean_details("dark-mode", False, EvaluationContext(targeting_key="u"))
    assert (refused.value, refused.error_code) == (False, ErrorCode.GENERAL)


def requests_seen(proxy: ProxyProcess, endpoint: str) -> float:
    text = httpx.get(f"{proxy.base_url}/__flags/metrics").text
    prefix = f'flagproxy_client_requests_total{{endpoint="{endpoint}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_429_makes_the_provider_back_off_for_retry_after_seconds(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    limited = proxy_factory(
        [origin.url], config=CONFIG + "[client_api]\nrate_limit_per_s = 0.2\n", flags=FLAGS
    )
    client = openfeature_client(limited.base_url)
    ctx = EvaluationContext(targeting_key="u")
    assert client.get_boolean_details("dark-mode", False, ctx).value is True
    limited_once = client.get_boolean_details("dark-mode", False, ctx)
    assert limited_once.error_code == ErrorCode.GENERAL  # the 429
    sent = requests_seen(limited, "ofrep_single")
    for _ in range(20):
        assert client.get_boolean_details("dark-mode", False, ctx).value is False  # the code default
    assert requests_seen(limited, "ofrep_single") == sent == 2  # the provider waited, sent nothing


def test_values_served_to_units_are_exposures_of_experiment_flags(
    client: OpenFeatureClient, proxy: ProxyProcess
) -> None:
    with httpx.Client(base_url=f"{proxy.base_url}/__flags", timeout=10) as http:

        def results() -> Any:
            return http.get("/api/experiments/price", headers={"Authorization": f"Bearer {ADMIN}"}).json()

        before = results()
        served: list[str] = []
        for i in range(20):
            got = client.get_string_details("price", "", EvaluationContext(targeting_key=f"exposed-{i}"))
            served.append(got.variant or "")
        # the compact call counts too (a unit served twice is one user), and a call without a unit not
        http.get("/client/v1/flags", params={"key": "exposed-0"}, headers={"X-API-Key": KEY})
        http.get("/client/v1/flags", headers={"X-API-Key": KEY})
        after = results()
    assert after["users"] == before["users"] + 20
    for variant in ("low", "high"):
        grew = after["srm"]["observed"][variant] - before["srm"]["observed"].get(variant, 0)
        assert grew == served.count(variant)
