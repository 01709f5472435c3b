"""``flagproxy experiments …``: an experiment's results from the admin API, or its statistics from counts.

``results FLAG`` reads ``GET {prefix}/api/experiments/{FLAG}``; ``stats NAME=USERS/CONVERSIONS …``
computes the same rows offline with ``proxy.experiments.stats``. Both print one table per goal with
``proxy.experiments.report`` (docs/experiments.md, "CLI"); the chat's ``/flag stats`` uses it too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from proxy.experiments.report import render_results, render_srm, render_table
from proxy.experiments.stats import srm, variant_rows

EXIT_FAILED = 1  # the server refused, or could not be reached
EXIT_USAGE = 2  # the command line is wrong


class UsageError(ValueError):
    """A malformed ``stats`` argument; the message names the problem."""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    experiments = sub.add_parser(
        "experiments", parents=parents, help="experiment results: from the admin API, or offline from counts"
    )
    actions = experiments.add_subparsers(dest="action", required=True)

    results = actions.add_parser("results", help="an experiment's results per goal, from the admin API")
    results.add_argument("flag", help="the experiment's flag key")
    results.add_argument("--goal", help="only this goal")
    results.add_argument("--json", action="store_true", help="print the server's JSON instead of tables")
    env = os.environ
    results.add_argument(
        "--url", default=env.get("FLAGPROXY_URL", "http://127.0.0.1:8080"), help="proxy base URL"
    )
    results.add_argument("--token", default=env.get("FLAGPROXY_ADMIN_TOKEN", ""), help="admin bearer token")
    results.add_argument("--prefix", default="/__flags", help="control-plane prefix (default /__flags)")

    stats = actions.add_parser("stats", help="the statistics of counts you give, offline")
    stats.add_argument(
        "arms", nargs="+", metavar="NAME=USERS/CONVERSIONS", help="one per variant; the first is the control"
    )
    stats.add_argument(
        "--weights", metavar="W,W,…", help="the flag's weights, in the arms' order (default: equal)"
    )
    stats.add_argument("--json", action="store_true", help='print {"srm": …, "variants": […]}')
    experiments.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_results(args) if args.action == "results" else run_stats(args)


# --- results: the admin API ----------------------------------------------------------------------------


def path_segment(text: str) -> str:
    """``text`` percent-encoded as one path segment: ``/``, ``?``, ``%`` … and all-dot names too."""
    encoded = quote(text, safe="")
    return encoded.replace(".", "%2E") if set(text) == {"."} else encoded


def run_results(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + f"{args.prefix}/api/experiments/{path_segment(args.flag)}"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(
            f"flagproxy: cannot reach {args.url}: {exc} (is the proxy running? --url, FLAGPROXY_URL)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not response.is_success:
        if payload is None:
            print(f"flagproxy: {url} answered {response.status_code}: {response.text[:500]}", file=sys.stderr)
        else:
            print(json.dumps(payload, indent=2, ensure_ascii=False), file=sys.stderr)
        if response.status_code == 401:
            given = "was refused" if args.token else "is missing"
            print(
                f"flagproxy: the admin token {given}: pass --token or set FLAGPROXY_ADMIN_TOKEN",
                file=sys.stderr,
            )
        return EXIT_FAILED
    if not isinstance(payload, dict):
        print(f"flagproxy: {url} answered {response.status_code} without a JSON object", file=sys.stderr)
        return EXIT_FAILED
    goals = payload.get("goals")
    goals = goals if isinstance(goals, dict) else {}
    if args.goal is not None:
        if args.goal not in goals:
            known = ", ".join(goals) or "none"
            print(f"flagproxy: {args.flag} has no goal {args.goal!r}; its goals: {known}", file=sys.stderr)
            return EXIT_FAILED
        goals = {args.goal: goals[args.goal]}
        payload = {**payload, "goals": goals}
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(render_results(payload, goals))
    return 0


# --- stats: offline, from counts ------------------------------------------------------------------------

_WHOLE = re.compile(r"[+-]?[0-9]+")


def _whole(text: str, what: str) -> int:
    text = text.strip()
    if not _WHOLE.fullmatch(text):
        raise UsageError(f"{what}: not a whole number: {text!r}")
    value = int(text)
    if value < 0:
        raise UsageError(f"{what}: must not be negative, got {value}")
    return value


def parse_arm(text: str) -> tuple[str, int, int]:
    """``NAME=USERS/CONVERSIONS`` → ``(name, users, conversions)``."""
    name, sep, counts = text.rpartition("=")
    users_text, slash, conversions_text = counts.partition("/")
    if not sep or not name or not slash:
        raise UsageError(f"{text!r}: expected NAME=USERS/CONVERSIONS, e.g. control=1412/183")
    users = _whole(users_text, f"{name}: users")
    conversions = _whole(conversions_text, f"{name}: conversions")
    if conversions > users:
        raise UsageError(f"{name}: more conversions ({conversions}) than users ({users})")
    return name, users, conversions


def parse_weights(text: str, count: int) -> list[float]:
    weights: list[float] = []
    for item in text.split(","):
        try:
            weight = float(item)
        except ValueError:
            raise UsageError(f"--weights: not a number: {item.strip()!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--weights: each weight must be a finite number >= 0, got {item.strip()!r}")
        weights.append(weight)
    if len(weights) != count:
        raise UsageError(f"--weights: {len(weights)} weights for {count} arms")
    if not any(weights):
        raise UsageError("--weights: at least one weight must be above 0")
    return weights


def offline_report(arm_texts: Sequence[str], weights_text: str | None) -> dict[str, Any]:
    """``{"srm": …, "variants": […]}`` for the arms as given on the command line."""
    arms = [parse_arm(text) for text in arm_texts]
    if len(arms) < 2:
        raise UsageError("give at least 2 arms: the control first, then one or more treatments")
    names = [name for name, _, _ in arms]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"arm names must differ: {', '.join(twice)} given more than once")
    weights = [1.0] * len(arms) if weights_text is None else parse_weights(weights_text, len(arms))
    return {
        "srm": srm([(name, users) for name, users, _ in arms], list(zip(names, weights, strict=True))),
        "variants": variant_rows(arms),
    }


def run_stats(args: argparse.Namespace) -> int:
    try:
        report = offline_report(args.arms, args.weights)
    except UsageError as exc:
        print(f"flagproxy experiments stats: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print(render_table(report["variants"]))
        print(render_srm(report["srm"]))
    return 0
