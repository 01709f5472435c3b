"""``flagproxy experiments``, run as the console script: ``stats`` from counts, ``results`` against a
real HTTP server on 127.0.0.1 that answers as the admin API does."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support import LOCALHOST, PYTHON, REPO, clean_env, free_port
from test_experiment_stats import assert_matches, oracle

from proxy.experiments.stats import srm

CONSOLE_SCRIPT = Path(PYTHON).parent / "flagproxy"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [PYTHON, "-m", "proxy"]
TOKEN = "experiments-test-token"
REFERENCE_ARGS = ("control=1412/183", "treatment_a=1396/232", "treatment_b=1392/257")

RESULTS: dict[str, Any] = {
    "flag": "signal-confidence-threshold",
    "control": "control",
    "window_hours": 72,
    "started_at": "2025-03-01T09:00:00Z",
    "users": 4200,
    "multiple_exposures": 3,
    "unattributed": 17,
    "srm": {
        "p_value": 0.923,
        "mismatch": False,
        "expected": {"control": 1 / 3, "treatment_a": 1 / 3, "treatment_b": 1 / 3},
        "observed": {"control": 1412, "treatment_a": 1396, "treatment_b": 1392},
    },
    "goals": {
        "trade": {
            "variants": [
                {"variant": "control", "users": 1412, "conversions": 183, "rate": 0.129603, "value": 10.5},
                {
                    "variant": "treatment_a",
                    "users": 1396,
                    "conversions": 232,
                    "rate": 0.166189,
                    "uplift": 0.28229,
                    "ci_low": 0.05263,
                    "ci_high": 0.51195,
                    "p_value": 0.01599,
                    "chance_to_win": 0.99200,
                    "value": 12.25,
                },
            ]
        },
        "signup": {
            "variants": [
                {"variant": "control", "users": 1412, "conversions": 0, "rate": 0.0},
                {
                    "variant": "treatment_a",
                    "users": 1396,
                    "conversions": 4,
                    "rate": 4 / 1396,
                    "uplift": None,
                    "ci_low": None,
                    "ci_high": None,
                    "p_value": None,
                    "chance_to_win": None,
                },
            ]
        },
    },
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "experiments", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
        cwd=REPO,
        env=clean_env(env or {}),
        check=False,
    )


# --- stats: offline ---------------------------------------------------------------------------------------


def test_stats_prints_the_reference_table() -> None:
    done = run_cli("stats", *REFERENCE_ARGS)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0].split("  ")[0] == "Variant"
    assert [h.strip() for h in lines[0].split("  ") if h] == [
        "Variant",
        "Users Exposed",
        "Conversions",
        "Conversion Rate",
        "vs. Control",
    ]
    control, a, b = lines[1:4]
    assert control.split()[:4] == ["control", "1,412", "183", "12.96%"] and "(control)" in control
    assert a.split() == ["treatment_a", "1,396", "232", "16.62%", "+28.2%", "[+5.3%,", "+51.2%]", "p=0.016"]
    assert b.split() == [
        "treatment_b",
        "1,392",
        "257",
        "18.46%",
        "+42.5%",
        "[+17.6%,",
        "+67.3%]",
        "p=0.00082",
    ]
    assert lines[4:] == ["SRM: p=0.923 (ok)"]  # equal weights without --weights


def test_stats_with_the_flags_weights_reports_the_mismatch() -> None:
    done = run_cli("stats", *REFERENCE_ARGS, "--weights", "50,25,25")
    assert done.returncode == 0, done.stderr
    srm_line = done.stdout.splitlines()[-1]
    assert srm_line.startswith("SRM: p=1.3e-98 MISMATCH")
    assert "do not trust these results" in srm_line


def test_stats_json_against_scipy() -> None:
    done = run_cli("stats", *REFERENCE_ARGS, "--weights", "50,25,25", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"srm", "variants"}
    control, *treatments = report["variants"]
    assert control == {"variant": "control", "users": 1412, "conversions": 183, "rate": 183 / 1412}
    for row, arm in zip(treatments, REFERENCE_ARGS[1:], strict=True):
        name, _, counts = arm.partition("=")
        users, conversions = map(int, counts.split("/"))
        assert (row["variant"], row["users"], row["conversions"]) == (name, users, conversions)
        assert_matches(row, oracle(users, conversions, 1412, 183), rel=1e-12)
    from scipy.stats import chisquare

    assert report["srm"]["mismatch"] is True
    want = float(chisquare([1412, 1396, 1392], [2100, 1050, 1050]).pvalue)
    assert report["srm"]["p_value"] == pytest.approx(want, rel=1e-11)
    assert report["srm"]["expected"] == {"control": 0.5, "treatment_a": 0.25, "treatment_b": 0.25}


def test_stats_json_nulls_where_undefined() -> None:
    done = run_cli("stats", "off=0/0", "on=10/0", "--json")
    assert done.returncode == 0, done.stderr
    control, row = json.loads(done.stdout)["variants"]
    assert control["rate"] is None and row["uplift"] is None and row["p_value"] is None
    table = run_cli("stats", "off=0/0", "on=10/0")
    assert table.stdout.splitlines()[2].split() == ["on", "10", "0", "0.00%", "n/a"]
    assert table.stdout.splitlines()[1].split()[3] == "n/a"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("control=1412", "t=1/1"), "expected NAME=USERS/CONVERSIONS"),
        (("control1412/183", "t=1/1"), "expected NAME=USERS/CONVERSIONS"),
        (("=1412/183", "t=1/1"), "expected NAME=USERS/CONVERSIONS"),
        (("control=x/183", "t=1/1"), "control: users: not a whole number"),
        (("control=10/2.5", "t=1/1"), "control: conversions: not a whole number"),
        (("control=10/11", "t=1/1"), "control: more conversions (11) than users (10)"),
        (("control=-10/1", "t=1/1"), "control: users: must not be negative"),
        (("control=10/-1", "t=1/1"), "control: conversions: must not be negative"),
        (("a=10/1", "b=10/1", "a=5/1"), "arm names must differ: a"),
        (("control=10/1",), "at least 2 arms"),
        (("a=10/1", "b=10/1", "--weights", "1,1,1"), "--weights: 3 weights for 2 arms"),
        (("a=10/1", "b=10/1", "--weights", "1,x"), "--weights: not a number: 'x'"),
        (("a=10/1", "b=10/1", "--weights", "1,-1"), "finite number >= 0, got '-1'"),
        (("a=10/1", "b=10/1", "--weights", "1,inf"), "finite number >= 0, got 'inf'"),
        (("a=10/1", "b=10/1", "--weights", "0,0"), "at least one weight must be above 0"),
    ],
)
def test_stats_refuses_bad_input(args: tuple[str, ...], message: str) -> None:
    done = run_cli("stats", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr, done.stderr


# --- results: against an HTTP server ----------------------------------------------------------------------


class AdminAPI(BaseHTTPRequestHandler):
    """The experiments endpoint as the admin API answers it; every request is recorded."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(
                401, {"error": "unauthorized", "detail": "a valid admin bearer token is required"}
            )
        if self.path == "/__flags/api/experiments/broken":
            return self.reply(500, b"<html>oops</html>")
        flag = self.path.removeprefix("/__flags/api/experiments/").removeprefix("/ops/api/experiments/")
        if flag in ("signal-confidence-threshold", "a%2Fb%20c%3F"):
            return self.reply(200, RESULTS)
        self.reply(404, {"error": "unknown_experiment", "detail": f"no experiment for flag {flag}"})

    def reply(self, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def admin_api() -> Iterator[str]:
    server = ThreadingHTTPServer((LOCALHOST, 0), AdminAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOCALHOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def seen() -> list[tuple[str, str | None]]:
    AdminAPI.seen.clear()
    return AdminAPI.seen


def test_results_prints_a_table_per_goal(admin_api: str, seen: list[tuple[str, str | None]]) -> None:
    done = run_cli("results", "signal-confidence-threshold", "--url", admin_api, "--token", TOKEN)
    assert (done.returncode, done.stderr) == (0, "")
    assert seen == [("/__flags/api/experiments/signal-confidence-threshold", f"Bearer {TOKEN}")]
    lines = done.stdout.splitlines()
    header = lines[0]
    assert header == (
        "Experiment signal-confidence-threshold: 4,200 users since 2025-03-01T09:00:00Z; window: 72 h;"
        " control: control; multiple exposures: 3; unattributed: 17"
    )
    assert "SRM: p=0.923 (ok)" in lines
    trade = lines.index("Goal: trade")
    assert lines[trade + 1].startswith("Variant")
    assert lines[trade + 2].split()[:4] == ["control", "1,412", "183", "12.96%"]
    assert "+28.2% [+5.3%, +51.2%] p=0.016" in lines[trade + 3]
    signup = lines.index("Goal: signup")
    assert lines[signup + 3].split() == ["treatment_a", "1,396", "4", "0.29%", "n/a"]


def test_results_reads_url_and_token_from_the_environment(
    admin_api: str, seen: list[tuple[str, str | None]]
) -> None:
    env = {"FLAGPROXY_URL": admin_api, "FLAGPROXY_ADMIN_TOKEN": TOKEN}
    done = run_cli("results", "signal-confidence-threshold", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == RESULTS  # the server's JSON as is
    assert seen[-1][1] == f"Bearer {TOKEN}"


def test_results_goal_filter(admin_api: str) -> None:
    common = ("--url", admin_api, "--token", TOKEN)
    only = run_cli("results", "signal-confidence-threshold", "--goal", "signup", *common)
    assert only.returncode == 0, only.stderr
    assert "Goal: signup" in only.stdout and "Goal: trade" not in only.stdout
    as_json = run_cli("results", "signal-confidence-threshold", "--goal", "trade", "--json", *common)
    assert json.loads(as_json.stdout)["goals"] == {"trade": RESULTS["goals"]["trade"]}
    unknown = run_cli("results", "signal-confidence-threshold", "--goal", "revenue", *common)
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert "'revenue'" in unknown.stderr and "trade, signup" in unknown.stderr


def test_results_percent_encodes_the_flag_and_takes_a_prefix(
    admin_api: str, seen: list[tuple[str, str | None]]
) -> None:
    done = run_cli("results", "a/b c?", "--url", admin_api + "/", "--token", TOKEN, "--prefix", "/ops")
    assert done.returncode == 0, done.stderr
    assert seen == [("/ops/api/experiments/a%2Fb%20c%3F", f"Bearer {TOKEN}")]


def test_results_errors(admin_api: str) -> None:
    missing = run_cli("results", "no-such-flag", "--url", admin_api, "--token", TOKEN)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert json.loads(missing.stderr)["error"] == "unknown_experiment"

    refused = run_cli("results", "signal-confidence-threshold", "--url", admin_api, "--token", "wrong")
    assert (refused.returncode, refused.stdout) == (1, "")
    body, hint = refused.stderr.rsplit("}", 1)
    assert json.loads(body + "}") == {
        "error": "unauthorized",
        "detail": "a valid admin bearer token is required",
    }
    assert "was refused" in hint and "FLAGPROXY_ADMIN_TOKEN" in hint
    no_token = run_cli("results", "signal-confidence-threshold", "--url", admin_api)
    assert no_token.returncode == 1 and "is missing" in no_token.stderr

    broken = run_cli("results", "broken", "--url", admin_api, "--token", TOKEN)
    assert broken.returncode == 1 and "answered 500: <html>oops</html>" in broken.stderr

    down = run_cli("results", "x", "--url", f"http://{LOCALHOST}:{free_port()}", "--token", TOKEN)
    assert (down.returncode, down.stdout) == (1, "")
    assert "cannot reach" in down.stderr and "refused" in down.stderr.lower()


def test_the_table_renders_what_the_stats_compute() -> None:
    """``results`` and ``stats`` share one renderer: the server's rows print as the offline ones."""
    from proxy.cli.experiments import render_srm, render_table
    from proxy.experiments.stats import variant_rows

    rows = variant_rows([("control", 1412, 183), ("treatment_a", 1396, 232), ("treatment_b", 1392, 257)])
    offline = run_cli("stats", *REFERENCE_ARGS).stdout
    assert offline.startswith(render_table(rows) + "\n")
    one_weighted = srm([("control", 1412), ("treatment_a", 1396)], [("control", 1), ("treatment_a", 0)])
    assert render_srm(one_weighted) == "SRM: n/a (needs at least 2 variants with a weight, and users)"
