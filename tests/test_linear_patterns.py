"""Patterns never freeze the worker: targeting regexes and route globs are matched in linear time.

A backtracking regex (``(a+)+$``) once froze the event loop for 9.7 s on a 29-character header, and
route globs with several ``**`` were quadratic (and worse). The catastrophic cases below would not
finish within the test run on a backtracking engine (they run in a child interpreter that is killed
after 60 s, so that such an engine fails the test instead of hanging it); here they are answered
like any other input.
Patterns the linear engine refuses (backreferences, lookarounds, atomic groups, possessive
quantifiers) are refused at load, naming the flag, and change nothing in the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PYTHON, REPO, ProxyProcess, RawOrigin, http_client, post_webhook, served_flags

from proxy.config import ConfigError, load_settings
from proxy.dataplane.context import make_context
from proxy.dataplane.upstream import Origin
from proxy.engine import FlagError, compile_flag
from proxy.observers.budget_alerts import route_pattern
from proxy.sources.registry import DEFAULT
from proxy.sources.split import compile_split
from proxy.store.change import Change, stored_text
from proxy.store.memory import MemoryStore

CATASTROPHIC = [
    # (name, pattern, a value it does not match that makes a backtracking engine explode)
    ("nested-29", "(a+)+$", "a" * 29 + "!"),  # the header that froze a worker for 9.7 s
    ("nested-8000", "(a+)+$", "a" * 8000 + "!"),
    ("overlapping-8000", "^(a|aa)*b$", "a" * 8000),
    ("adjacent-5000", "(x+x+)+y", "x" * 5000),
    ("words-8001", "^(\\w+\\s?)*$", "word " * 1600 + "!"),
]
TESTS = Path(__file__).resolve().parent


def bounded(probe: Callable[..., Any], *args: Any) -> Any:
    """``probe(*args)`` — a function of this module — in a fresh interpreter, given 60 s.

    A backtracking engine stuck on these inputs sits in C code holding the GIL: no timeout inside
    the test process could stop it, a child process can be killed. The bound is no timing of the
    fix, which answers each case in well under a millisecond.
    """
    code = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]\n"
        "import test_linear_patterns as module\n"
        f"print(json.dumps(module.{probe.__name__}(*json.load(sys.stdin))))\n"
    )
    try:
        done = subprocess.run(
            [PYTHON, "-c", code],
            input=json.dumps(args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{probe.__name__} did not come back within 60 s: the matching backtracks")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


SECRET = "patterns-secret"
TOKEN = "patterns-admin-token"


def regex_flag(pattern: str) -> Any:
    return compile_flag(
        "rx",
        {
            "variants": {"hit": {"weight": 0}, "miss": {"weight": 1}},
            "defaultVariant": "miss",
            "rules": [{"if": {"regex": [{"var": "ua"}, pattern]}, "variant": "hit"}],
        },
    )


def served(flag: Any, **attributes: Any) -> Any:
    return flag.evaluate(make_context("user-1", attributes)).value


# --- JsonLogic `regex` -----------------------------------------------------------------------------


def probe_regex_rules(cases: list[list[str]]) -> dict[str, Any]:
    return {name: served(regex_flag(pattern), ua=value) for name, pattern, value in cases}


def test_catastrophic_regex_rules_are_answered_like_any_other() -> None:
    assert bounded(probe_regex_rules, CATASTROPHIC) == {name: "miss" for name, _, _ in CATASTROPHIC}


def test_the_same_rules_still_match_what_they_should() -> None:
    assert served(regex_flag("(a+)+$"), ua="!" + "a" * 29) == "hit"
    assert served(regex_flag("^(a|aa)*b$"), ua="a" * 40 + "b") == "hit"
    assert served(regex_flag("@example\\.com\\Z"), ua="ann@example.com") == "hit"  # Python's \Z
    assert served(regex_flag("^caf\\u00e9$"), ua="café") == "hit"  # Python's \uXXXX
    assert served(regex_flag("(?i)^ACME"), ua="acme corp") == "hit"


def probe_runtime_patterns() -> list[Any]:
    flag = compile_flag(
        "dyn",
        {
            "variants": {"hit": {"weight": 0}, "miss": {"weight": 1}},
            "defaultVariant": "miss",
            "rules": [{"if": {"regex": [{"var": "ua"}, {"var": "p"}]}, "variant": "hit"}],
        },
    )
    return [
        served(flag, ua="a" * 29 + "!", p="(a+)+$"),
        served(flag, ua="!aaa", p="(a+)+$"),
        served(flag, ua="aa", p="(a)\\1"),  # refused by RE2: matches nothing, never raises
        served(flag, ua="a" * 2000, p="a" * 2000),  # longer than 1,024 characters: not used
    ]


def test_a_runtime_pattern_from_the_request_is_linear_too() -> None:
    assert bounded(probe_runtime_patterns) == ["miss", "hit", "miss", "miss"]


def test_values_longer_than_8192_characters_never_match() -> None:
    from proxy.engine.patterns import MAX_INPUT_CHARS

    assert MAX_INPUT_CHARS == 8192  # the documented bound
    flag = regex_flag("a")
    assert served(flag, ua="a" * 8192) == "hit"
    assert served(flag, ua="a" * 8193) == "miss"


def probe_100000_characters() -> list[bool]:
    from proxy.engine.patterns import Pattern

    long = "a" * 100_000
    return [
        Pattern("^(a|aa)*b$").fullmatch(long),
        Pattern("(a+)+").fullmatch(long),
        Pattern("(a+)+$").fullmatch(long + "!"),
    ]


def test_the_engine_is_linear_on_100000_characters() -> None:
    assert bounded(probe_100000_characters) == [False, True, False]


@pytest.mark.parametrize(
    "pattern",
    [
        "(\\w)\\1",  # backreference
        "foo(?=bar)",  # lookahead
        "(?<!x)y",  # lookbehind
        "(?>ab|a)c",  # atomic group
        "a++b",  # possessive quantifier
    ],
)
def test_patterns_the_linear_engine_refuses_are_refused_at_load(pattern: str) -> None:
    with pytest.raises(FlagError) as refused:
        regex_flag(pattern)
    assert refused.value.path == "flags.rx.rules[0].if.regex[1]"
    assert "RE2 cannot compile" in refused.value.message


# --- Split MATCHES_STRING --------------------------------------------------------------------------


def split_matching(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "trafficTypeName": "user",
        "trafficAllocation": 100,
        "trafficAllocationSeed": 1,
        "seed": 2,
        "status": "ACTIVE",
        "killed": False,
        "defaultTreatment": "off",
        "changeNumber": 1,
        "algo": 2,
        "conditions": [
            {
                "conditionType": "ROLLOUT",
                "label": "rx",
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [
                        {
                            "keySelector": {"trafficType": "user", "attribute": "ua"},
                            "matcherType": "MATCHES_STRING",
                            "negate": False,
                            "stringMatcherData": pattern,
                        }
                    ],
                },
                "partitions": [{"treatment": "on", "size": 100}],
            }
        ],
    }


def probe_split_matchers(cases: list[list[str]]) -> dict[str, Any]:
    out = {}
    for name, pattern, value in cases:
        flag = compile_split({"rx": split_matching("rx", pattern)})["rx"]
        out[name] = flag.evaluate(make_context("user-1", {"ua": value})).value
    return out


def test_catastrophic_split_matchers_are_answered_like_any_other() -> None:
    assert bounded(probe_split_matchers, CATASTROPHIC) == {name: "off" for name, _, _ in CATASTROPHIC}


def test_a_split_matcher_still_matches() -> None:
    flag = compile_split({"rx": split_matching("rx", "(a+)+$")})["rx"]
    assert flag.evaluate(make_context("user-1", {"ua": "!" + "a" * 29})).value == "on"


def test_a_split_with_a_pattern_re2_refuses_is_a_problem_and_not_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore(compiler=DEFAULT)
    upsert = {
        "look": stored_text(split_matching("look", "foo(?=bar)")),
        "fine": stored_text(split_matching("fine", "^foo")),
    }
    with caplog.at_level(logging.ERROR, logger="flagproxy.store"):
        asyncio.run(store.apply(Change(source="split", upsert=upsert)))
    assert sorted(store.snapshot.flags) == ["fine"]
    reported = [r.getMessage() for r in caplog.records if "'look'" in r.getMessage()]
    assert len(reported) == 1
    assert "does not compile and is not served" in reported[0]
    assert "RE2 cannot compile 'foo(?=bar)'" in reported[0]


# --- refused at the webhook and the admin API: 422 naming the flag, nothing changes ------------------


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    flags = {"flags": {"kept": {"enabled": True}}}
    env = {"FLAGPROXY_WEBHOOKS_SECRET": SECRET, "FLAGPROXY_ADMIN_TOKEN": TOKEN}
    proxy: ProxyProcess = proxy_factory([origin.url], flags=flags, env=env)
    return proxy


def rule(pattern: str) -> dict[str, Any]:
    return {"enabled": False, "rules": [{"if": {"regex": [{"var": "ua"}, pattern]}, "value": True}]}


@pytest.mark.parametrize("pattern", ["(\\w)\\1", "foo(?=bar)", "(?>ab|a)c", "a++b"])
def test_the_webhook_refuses_a_pattern_re2_cannot_compile(
    proxy: ProxyProcess, origin: RawOrigin, pattern: str
) -> None:
    before = served_flags(proxy, origin)
    document = {"flags": {"kept": {"enabled": True}, "bad": rule(pattern)}}
    refused = post_webhook(proxy.base_url, document, SECRET)
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["error"] == "invalid_flags"
    assert body["field"] == "flags.bad.rules[0].if.regex[1]"
    assert "flags.bad.rules[0].if.regex[1]" in body["detail"] and "RE2 cannot compile" in body["detail"]
    assert served_flags(proxy, origin) == before == {"kept": True}


def test_the_admin_api_refuses_a_pattern_re2_cannot_compile(proxy: ProxyProcess, origin: RawOrigin) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    api = f"{proxy.base_url}/__flags/api"
    version = http_client().get(f"{api}/flags", headers=auth).json()["version"]
    refused = http_client().put(f"{api}/flags/bad", headers=auth, content=json.dumps(rule("(a)\\1")))
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "invalid_flags"
    assert refused.json()["field"] == "flags.bad.rules[0].if.regex[1]"
    assert http_client().get(f"{api}/flags", headers=auth).json()["version"] == version
    assert "bad" not in served_flags(proxy, origin)


# --- route globs ------------------------------------------------------------------------------------

QUADRATIC_GLOB = "/**a**a**a**b"  # four unbounded runs: O(n^4) under backtracking
LONG_PATH = "/" + "a" * 100_000


def probe_long_paths(config_dir: str) -> dict[str, Any]:
    flag = compile_flag("g", {"routes": [QUADRATIC_GLOB, "/x/*/y/*/z"]})
    config = Path(config_dir) / "flagproxy.toml"
    config.write_text(f'[[routes]]\npath = "{QUADRATIC_GLOB}"\nread_timeout_s = 7.0\n')
    settings = load_settings(config, env={}, origins=["http://127.0.0.1:9"])
    origin = Origin.from_settings(settings.origins[0], settings)
    budget_flag = compile_flag("b", {"routes": [QUADRATIC_GLOB]})
    outcome = budget_flag.evaluate(make_context("user-1", {}))
    return {
        "flag": [
            flag.applies_to(LONG_PATH),
            flag.applies_to(LONG_PATH + "b"),
            flag.applies_to("/x/" + "q" * 100_000 + "/y/q/zz"),
        ],
        "[[routes]] read timeout": [
            origin.timeouts_for(LONG_PATH).read,
            origin.timeouts_for(LONG_PATH + "b").read,
        ],
        "default read timeout": settings.upstream.read_timeout_s,
        "budget alert route": [
            route_pattern("/", LONG_PATH, [(budget_flag, outcome)]),
            route_pattern("/", LONG_PATH + "b", [(budget_flag, outcome)]),
        ],
    }


def test_globs_with_several_double_stars_match_long_paths(tmp_path: Path) -> None:
    """Flag routes, ``[[routes]]`` timeouts and the budget alerts' route names, on 100,000 characters."""
    answers = bounded(probe_long_paths, str(tmp_path))
    default = answers["default read timeout"]
    assert default != 7.0
    assert answers == {
        "flag": [False, True, False],
        "[[routes]] read timeout": [default, 7.0],
        "default read timeout": default,
        "budget alert route": ["/", QUADRATIC_GLOB],
    }


def test_a_glob_too_large_for_the_linear_engine_is_refused_at_load(tmp_path: Path) -> None:
    huge = "/**/" + "a/*" * 3000  # 9,000 characters, 3,000 runs: beyond a glob's memory budget
    with pytest.raises(FlagError) as refused:
        compile_flag("g", {"routes": ["/ok/**", huge]})
    assert refused.value.path == "flags.g.routes"
    assert "pattern too large" in refused.value.message
    config = tmp_path / "flagproxy.toml"
    config.write_text(f'[[routes]]\npath = "{huge}"\nread_timeout_s = 1.0\n')
    settings = load_settings(config, env={}, origins=["http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match=r"\[\[routes\]\] path: RE2 cannot compile .*pattern too large"):
        Origin.from_settings(settings.origins[0], settings)


def tokens(glob: str) -> Iterator[str]:
    i = 0
    while i < len(glob):
        step = 2 if glob.startswith("**", i) else 1
        yield glob[i : i + step]
        i += step


def reference_match(glob: str, path: str) -> bool:
    """The glob rules read literally (docs/flags.md), by dynamic programming: ``**`` any run of
    characters but a newline, ``*`` any run without ``/``, ``?`` one character other than ``/``."""
    parts = list(tokens(glob))

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(parts):
            return j == len(path)
        part, more = parts[i], j < len(path)
        if part == "**":
            return match(i + 1, j) or (more and path[j] != "\n" and match(i, j + 1))
        if part == "*":
            return match(i + 1, j) or (more and path[j] != "/" and match(i, j + 1))
        if part == "?":
            return more and path[j] != "/" and match(i + 1, j + 1)
        return more and path[j] == part and match(i + 1, j + 1)

    return match(0, 0)


GLOB_PARTS = st.sampled_from(["a", "b", "/", "*", "**", "?", ".", "é", "\n", "[", "("])
PATH_CHARS = st.sampled_from(["a", "b", "/", ".", "é", "\n", "[", "*"])


@st.composite
def glob_and_path(draw: st.DrawFn) -> tuple[str, str]:
    """A glob, and a path that often fits it (each wildcard filled in), sometimes mutated."""
    glob = "/" + "".join(draw(st.lists(GLOB_PARTS, max_size=10)))
    filled = []
    for part in tokens(glob):
        if part in ("*", "**"):
            filled.append("".join(draw(st.lists(PATH_CHARS, max_size=4))))
        elif part == "?":
            filled.append(draw(PATH_CHARS))
        else:
            filled.append(part)
    path = "".join(filled)
    if draw(st.booleans()):
        path = draw(st.text(PATH_CHARS, max_size=12).map(lambda tail: "/" + tail))
    return glob, path


@settings(max_examples=600, deadline=None)
@given(glob_and_path())
def test_route_globs_match_exactly_what_the_rules_say(case: tuple[str, str]) -> None:
    glob, path = case
    assert compile_flag("g", {"routes": [glob]}).applies_to(path) == reference_match(glob, path)


@settings(max_examples=300, deadline=None)
@given(st.lists(glob_and_path(), min_size=1, max_size=3), st.text(PATH_CHARS, max_size=12))
def test_a_flag_applies_when_any_of_its_globs_matches(cases: list[tuple[str, str]], tail: str) -> None:
    globs = [glob for glob, _ in cases]
    flag = compile_flag("g", {"routes": globs})
    for path in [path for _, path in cases] + ["/" + tail]:
        assert flag.applies_to(path) == any(reference_match(glob, path) for glob in globs)


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.sampled_from(["^a+$", "(ab|a)*c", "[0-9]{2,}", "é+", "x|y|z", "^$", "(?i)ios", "a.b", "\\d+"]),
    text=st.text(alphabet="abcxyzé019IOSios.\n", max_size=30),
)
def test_the_direct_match_agrees_with_the_bindings_own_search(pattern: str, text: str) -> None:
    from proxy.engine.patterns import Pattern

    compiled = Pattern(pattern)
    raw = re2.compile(pattern)
    assert compiled.search(text) is (raw.search(text) is not None)
    assert compiled.fullmatch(text) is (raw.fullmatch(text) is not None)
