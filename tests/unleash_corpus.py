"""Generated Unleash features x contexts, and the real SDK (``UnleashClient`` 6.9.1) as the oracle.

The generator reaches every strategy and constraint operator with values of every shape the engine
treats differently (numbers Rust refuses, dates with too many fraction digits, versions with a
``v``, CIDRs with host bits, unparsable regexes, quotes that break the rule grammar). It avoids only
what the SDK answers at random: a rollout or variant pick with no stickiness value falls back to
a random draw, so every context has a ``userId`` or ``sessionId``, variant stickiness properties are
ones every context has, and random rollouts use percentages that make the draw irrelevant.

The oracle is a bootstrapped client that never connects: features go in through the SDK's own
bootstrap cache, and its static context (the client's appName/environment) is emptied so that both
sides see exactly the context the test gives.
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
from collections import Counter
from typing import Any

OPERATORS = (
    "IN",
    "NOT_IN",
    "STR_STARTS_WITH",
    "STR_ENDS_WITH",
    "STR_CONTAINS",
    "NUM_EQ",
    "NUM_GT",
    "NUM_GTE",
    "NUM_LT",
    "NUM_LTE",
    "DATE_AFTER",
    "DATE_BEFORE",
    "SEMVER_EQ",
    "SEMVER_GT",
    "SEMVER_LT",
    "SEMVER_GTE",
    "SEMVER_LTE",
    "REGEX",
    "IN_CIDR",
)
STRATEGIES = (
    "default",
    "userWithId",
    "gradualRolloutUserId",
    "gradualRolloutSessionId",
    "gradualRolloutRandom",
    "remoteAddress",
    "flexibleRollout",
    "applicationHostname",
)

USERS = ["u1", "u2", "u3", "user-42", "", "Ünïcødé", "a b", "7", "u1 "]
SESSIONS = ["s1", "s2", "sess-9", "", "0"]
COUNTRIES = ["no", "se", "NO", "dk", "gießen", "GIESSEN", 'q"t', "c\\"]
NUMBERS = ["5", "10.5", "-3", "1e2", "+85", " 90", "1_0", "inf", "NaN", "abc", "100", "0", "5.", ".5", "٣"]
DATES = [
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00.000Z",
    "2024-06-01T12:00:00+02:00",
    "2024-03-01 10:00:00Z",
    "2024-03-01T10:00:00.123456789Z",
    "2024-03-01T10:00:00+0200",
    "2024-03-01T10:00:00",
    "2024-03-01",
    "1709287200",
    "2025-12-31T23:59:59-05:00",
]
VERSIONS = [
    "1.2.3",
    "1.2.3-alpha",
    "1.2.3-beta.2",
    "1.2.3-beta.11",
    "1.10.0",
    "v1.2.3",
    "1.2",
    " 1.2.3",
    "1.2.3+build.5",
    "2.0.0",
    "01.2.3",
    "1.2.3-01",
    "10",
]
IPS = [
    "10.1.2.3",
    "192.168.7.13",
    "192.168.7.20",
    "::1",
    "::ffff:10.0.0.1",
    "10.0.0.1:80",
    " 10.0.0.1",
    "fe80::1%eth0",
    "2001:db8::5",
    "8.8.8.8",
    "bad",
]
EMAILS = ["ann@acme.com", "BOB@ACME.COM", "carl@example.org", "", "dan@acme.co"]
TIERS = ["free", "pro", "team"]  # every context has a tier: variant stickiness on it is never random

CONSTRAINT_VALUES: dict[str, list[str]] = {
    "IN": ["u1", "u2", "no", "se", "free", "pro", "5", "", 'q"t', "c\\", "ann@acme.com", "10.1.2.3"],
    "STR": ["u", "1", "no", "GIE", "gieß", "acme", "ACME.COM", ".org", "", 'q"', "Ün"],
    "NUM": [
        "5",
        "10.5",
        "-3",
        "1e2",
        "+7",
        "100",
        "0",
        "5.",
        "abc",
        "2024-01-01T00:00:00Z",
        "1.2.3",
        "1.5e1",
        "0.0",
    ],
    "DATE": [
        "2024-01-01T00:00:00Z",
        "2024-03-01T10:00:00.000Z",
        "2024-06-01T12:00:00+02:00",
        "2024-03-01T10:00:00.123456Z",
        "2024-03-01",
        "5",
        "2025-01-01T00:00:00-05:00",
    ],
    "SEMVER": [
        "1.2.3",
        "v1.2.3",
        "1.2.3-beta.2",
        "01.2.3",
        "1.2",
        "10",
        "2.0.0",
        "1.2.3-alpha+x",
        "1.10.0",
    ],
    "REGEX": ["^u[0-9]$", "acme\\.com$", "(?i)ACME", "[", "^$", "ß", ".*", "^[a-z]+$", "o\\b", "Ü"],
    "CIDR": [
        "10.0.0.0/8",
        "192.168.7.12/30",
        "::1/128",
        "2001:db8::/32",
        "bad",
        "8.8.8.8",
        "10.0.0.1/33",
        " 10.0.0.0/8",
    ],
}
FIELDS = {
    "IN": ["userId", "sessionId", "country", "tier", "appName", "environment", "email", "nope", "age"],
    "STR": ["userId", "country", "email", "nope", "sessionId"],
    "NUM": ["age", "score", "userId", "nope", "currentTime", "when"],
    "DATE": ["currentTime", "when", "nope", "age"],
    "SEMVER": ["version", "nope", "age"],
    "REGEX": ["userId", "email", "country", "nope"],
    "CIDR": ["remoteAddress", "ip", "nope"],
}


def _family(operator: str) -> str:
    if operator in ("IN", "NOT_IN"):
        return "IN"
    if operator == "IN_CIDR":
        return "CIDR"
    return operator.split("_")[0] if operator != "REGEX" else "REGEX"


class Corpus:
    """Reproducible features (with segments) and contexts; ``used`` counts operators and strategies."""

    def __init__(self, seed: int, features: int, contexts: int) -> None:
        self.rng = random.Random(seed)
        self.used: Counter[str] = Counter()
        self.hostname = socket.gethostname()
        self.segments = [
            {
                "id": i,
                "name": f"seg{i}",
                "constraints": [self.constraint() for _ in range(self.rng.randint(1, 2))],
            }
            for i in range(1, 4)
        ]
        self.features: list[dict[str, Any]] = []
        for i in range(features):
            self.features.append(self.feature(i))
        self.contexts = [self.context() for _ in range(contexts)]

    @property
    def body(self) -> dict[str, Any]:
        return {"version": 2, "features": self.features, "segments": self.segments}

    # --- definitions ---

    def constraint(self) -> dict[str, Any]:
        rng = self.rng
        operator = rng.choice(OPERATORS)
        self.used[operator] += 1
        family = _family(operator)
        out: dict[str, Any] = {"contextName": rng.choice(FIELDS[family]), "operator": operator}
        if rng.random() < 0.02:
            out["contextName"] = 'we"ird'  # breaks the rule grammar: the feature is off
        pool = CONSTRAINT_VALUES["STR" if family == "STR" else family]
        if operator in ("IN", "NOT_IN", "IN_CIDR") or family == "STR":
            out["values"] = rng.sample(pool, k=rng.randint(0 if rng.random() < 0.05 else 1, 3))
        else:
            out["value"] = rng.choice(pool)
        if rng.random() < 0.3:
            out["inverted"] = True
        if rng.random() < 0.3:
            out["caseInsensitive"] = True
        if rng.random() < 0.01:
            out["operator"] = "STR_MATCHES"  # unknown to the engine: the feature is off
        return out

    def _variants(self, strategy: bool) -> list[dict[str, Any]]:
        rng = self.rng
        variants = []
        for j in range(rng.randint(1, 3)):
            variant: dict[str, Any] = {"name": rng.choice(["blue", "green", "red", f"v{j}"]), "weight": 0}
            variant["weight"] = rng.choice([0, 1, 50, 333, 500, 1000])
            if rng.random() < 0.6:
                kind = rng.choice(["string", "json", "number", "csv"])
                value = {"json": '{"a": 1, "b": [true, null]}', "number": "42", "csv": "a,b"}.get(kind, "hi")
                if kind == "json" and rng.random() < 0.2:
                    value = "{not json"
                variant["payload"] = {"type": kind, "value": value}
            if not strategy:
                variant["stickiness"] = rng.choice(["default", "tier"])  # never missing: no random pick
                if rng.random() < 0.3:
                    field = rng.choice(["userId", "country", "tier", "sessionId", "currentTime"])
                    variant["overrides"] = [
                        {"contextName": field, "values": rng.sample([*USERS[:3], "no", "pro", "s1"], k=2)}
                    ]
            variants.append(variant)
        if sum(v["weight"] for v in variants) == 0:
            variants[0]["weight"] = 100  # a zero total fails the SDK's call
        return variants

    def strategy(self, feature: str) -> dict[str, Any]:
        rng = self.rng
        name = rng.choice([*STRATEGIES, "flexibleRollout", "flexibleRollout", "myCustomStrategy"])
        self.used[name] += 1
        params: dict[str, str] = {}
        percentages = ["0", "1", "33", "50", "99", "100", "33.5", "+5", "007", "150", "-1", ""]
        if name == "userWithId":
            params["userIds"] = ", ".join(rng.sample([*USERS, 'q"t'], k=rng.randint(1, 4)))
        elif name in ("gradualRolloutUserId", "gradualRolloutSessionId"):
            params["percentage"] = rng.choice(percentages)
            if rng.random() < 0.9:
                params["groupId"] = rng.choice([feature, "grp", ""])
        elif name == "gradualRolloutRandom":
            params["percentage"] = rng.choice(["0", "1", "100", "150", "33.5"])  # the draw cannot matter
        elif name == "remoteAddress":
            params["IPs"] = ", ".join(rng.sample(CONSTRAINT_VALUES["CIDR"], k=rng.randint(1, 3)))
        elif name == "applicationHostname":
            params["hostNames"] = ", ".join(
                rng.sample([self.hostname.upper(), "other-host", ""], k=rng.randint(1, 2))
            )
        elif name == "flexibleRollout":
            stickiness = rng.choice(["default", "default", "userId", "sessionId", "country", "random", None])
            rollout = rng.choice(percentages[:6] + percentages[6:] * (rng.random() < 0.2))
            if stickiness == "random":
                rollout = rng.choice(["0", "100"])
            params["rollout"] = rollout
            if stickiness is not None:
                params["stickiness"] = stickiness
            if rng.random() < 0.7:
                params["groupId"] = rng.choice([feature, "grp", 'g"q'])
        strategy: dict[str, Any] = {"name": name, "parameters": params}
        if rng.random() < 0.5:
            strategy["constraints"] = [self.constraint() for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.25:
            strategy["segments"] = rng.sample(
                [1, 2, 3, 3, 9][: 4 if rng.random() < 0.95 else 5], k=rng.randint(1, 2)
            )
        if rng.random() < 0.3:
            if params.get("stickiness") == "random":  # a pick sticky on nothing would be random
                strategy["variants"] = self._variants(True)[:1]
                strategy["variants"][0]["weight"] = 10
            else:
                strategy["variants"] = self._variants(True)
        return strategy

    def feature(self, i: int) -> dict[str, Any]:
        rng = self.rng
        name = f"f{i}" if rng.random() < 0.9 else f"fé.{i}"
        feature: dict[str, Any] = {
            "name": name,
            "enabled": rng.random() < 0.85,
            "strategies": [self.strategy(name) for _ in range(rng.choice([0, 1, 1, 2, 3]))],
            "variants": self._variants(False) if rng.random() < 0.4 else [],
        }
        if self.features and rng.random() < 0.2:
            parent = rng.choice(self.features[-10:])["name"] if rng.random() < 0.95 else "no-such-feature"
            dependency: dict[str, Any] = {"feature": parent}
            if rng.random() < 0.3:
                dependency["enabled"] = rng.random() < 0.5
            if rng.random() < 0.3:
                dependency["variants"] = rng.sample(["blue", "green", "v0", "red"], k=rng.randint(0, 2))
            feature["dependencies"] = [dependency]
        return feature

    # --- contexts ---

    def context(self) -> dict[str, Any]:
        rng = self.rng
        context: dict[str, Any] = {"properties": {"tier": rng.choice(TIERS)}}
        who = rng.random()
        if who < 0.8:
            context["userId"] = rng.choice(USERS) if rng.random() < 0.7 else f"user{rng.randrange(10**6)}"
        if who >= 0.6:
            context["sessionId"] = rng.choice(SESSIONS) if rng.random() < 0.5 else f"s{rng.randrange(10**6)}"
        if rng.random() < 0.7:
            context["remoteAddress"] = rng.choice(IPS)
        if rng.random() < 0.9:
            context["currentTime"] = rng.choice(DATES[:6])
        for name, pool in (("appName", ["web", "api"]), ("environment", ["production", "dev"])):
            if rng.random() < 0.6:
                context[name] = rng.choice(pool)
        props = context["properties"]
        for name, pool in (
            ("country", COUNTRIES),
            ("age", NUMBERS),
            ("score", NUMBERS),
            ("version", VERSIONS),
            ("email", EMAILS),
            ("ip", IPS),
            ("when", DATES),
        ):
            if rng.random() < 0.7:
                props[name] = rng.choice(pool)
        if rng.random() < 0.1:
            context["country"] = rng.choice(COUNTRIES)  # a top-level extra key: the SDK makes it a property
        return context


class Oracle:
    """``UnleashClient`` 6.9.1 loaded with one features body, offline."""

    def __init__(self, body: dict[str, Any]) -> None:
        from UnleashClient import UnleashClient
        from UnleashClient.cache import FileCache
        from UnleashClient.utils import InstanceAllowType

        self._dir = tempfile.TemporaryDirectory()
        cache = FileCache("flagproxy-differential", directory=self._dir.name)
        cache.bootstrap_from_dict(json.loads(json.dumps(body)))
        self.client = UnleashClient(
            url="http://127.0.0.1:9",  # never contacted: initialize_client is not called
            app_name="flagproxy-differential",
            disable_metrics=True,
            disable_registration=True,
            cache=cache,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
        )
        self.client.unleash_static_context = {}

    def answer(self, feature: str, context: dict[str, Any]) -> dict[str, Any]:
        enabled = self.client.is_enabled(feature, context)
        variant = self.client.get_variant(feature, context)
        return {"enabled": enabled, "variant": variant}

    def close(self) -> None:
        self.client.destroy()
        self._dir.cleanup()
