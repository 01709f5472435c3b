"""``flagproxy eval --source unleash``: the offline contract, and how bad input is refused.

Expected answers are written out by hand from Unleash's rules (hash values from murmur3 computed
with mmh3 directly), and the CLI's output is also checked against the real SDK on the same inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mmh3
import pytest

from proxy.cli import main
from proxy.engine import FlagError
from proxy.sources.registry import DEFAULT
from proxy.sources.unleash import CONTEXT_KEY, from_request, from_sdk_context, load_file

FEATURES = {
    "version": 2,
    "features": [
        {"name": "off", "enabled": False, "strategies": [{"name": "default"}]},
        {"name": "plain", "enabled": True, "strategies": [{"name": "default"}]},
        {
            "name": "colours",
            "enabled": True,
            "strategies": [{"name": "userWithId", "parameters": {"userIds": "ann, bob"}}],
            "variants": [
                {
                    "name": "blue",
                    "weight": 1,
                    "stickiness": "default",
                    "payload": {"type": "json", "value": '{"a":1}'},
                },
                {"name": "red", "weight": 0, "overrides": [{"contextName": "userId", "values": ["bob"]}]},
            ],
        },
        {
            "name": "segmented",
            "enabled": True,
            "strategies": [{"name": "default", "segments": [7]}],
        },
    ],
    "segments": [{"id": 7, "constraints": [{"contextName": "plan", "operator": "IN", "values": ["pro"]}]}],
}


@pytest.fixture
def features_file(tmp_path: Path) -> Path:
    path = tmp_path / "features.json"
    path.write_text(json.dumps(FEATURES))
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_keys_file_answers_like_the_sdk_contract(
    features_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text(
        '{"userId": "ann", "properties": {"plan": "pro"}}\n'
        "\n"
        '{"userId": "bob"}\n'
        '{"plan": "pro", "sessionId": "s"}\n'
    )
    code, out, _ = _run(
        capsys, "eval", "--source", "unleash", "--flags", str(features_file), "--keys-file", str(contexts)
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    off = {"enabled": False, "variant": "disabled", "payload": None}
    on = {"enabled": True, "variant": "disabled", "payload": None}
    blue = {"enabled": True, "variant": "blue", "payload": {"type": "json", "value": '{"a":1}'}}
    assert lines == [
        {"key": "ann", "flags": {"colours": blue, "off": off, "plain": on, "segmented": on}},
        {
            "key": "bob",
            "flags": {
                "colours": {"enabled": True, "variant": "red", "payload": None},  # the override wins
                "off": off,
                "plain": on,
                "segmented": off,
            },
        },
        {"key": None, "flags": {"colours": off, "off": off, "plain": on, "segmented": on}},  # plan moved
    ]


def test_eval_refuses_bad_input_with_the_line_number(
    features_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contexts = tmp_path / "contexts.jsonl"
    for text, message in (
        ('{"userId": "a"}\n[1]\n', "line 2: expected an Unleash context object"),
        ('{"userId": "a"}\nnot json\n', "line 2: not JSON"),
        ('{"properties": 5}\n', 'line 1: "properties" must be an object'),
    ):
        contexts.write_text(text)
        code, _, err = _run(
            capsys, "eval", "--source", "unleash", "--flags", str(features_file), "--keys-file", str(contexts)
        )
        assert code == 2 and message in err, err


def test_malformed_features_are_refused_whole_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    for body, message in (
        ("{", "invalid JSON"),
        ('{"features": 3}', "expected a list of features"),
        ('{"features": [{"name": "x", "enabled": "yes"}]}', "enabled: must be true or false"),
        (
            '{"features": [{"name": "x", "enabled": true, "strategies": [{"name": "flexibleRollout",'
            ' "parameters": {"rollout": 50}}]}]}',
            "parameters must be an object of strings",
        ),
    ):
        bad.write_text(body)
        with pytest.raises(FlagError, match=message):
            load_file(bad)
        code, _, err = _run(capsys, "eval", "--source", "unleash", "--flags", str(bad), "--key", "u")
        assert code == 2 and message in err


def test_eval_single_key_maps_attributes_to_properties(
    features_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(
        capsys,
        "eval",
        "--source",
        "unleash",
        "--flags",
        str(features_file),
        "--key",
        "ann",
        "--attr",
        "plan=pro",
    )
    assert code == 0
    assert json.loads(out) == {"colours": "blue", "off": False, "plain": True, "segmented": True}


def test_rollout_hash_is_murmur3_of_group_and_user() -> None:
    """flexibleRollout at p% is on exactly when murmur3("<group>:<userId>") % 100 + 1 <= p."""
    body = {
        "features": [
            {
                "name": f"r{p}",
                "enabled": True,
                "strategies": [
                    {
                        "name": "flexibleRollout",
                        "parameters": {"rollout": str(p), "stickiness": "userId", "groupId": "g"},
                    }
                ],
            }
            for p in (0, 1, 25, 50, 99, 100)
        ]
    }
    flags = DEFAULT.get("unleash").compile(
        {"flags": {f["name"]: json.dumps(f) for f in body["features"]}}, {}
    )[0]
    for i in range(300):
        user = f"user-{i}"
        bucket = mmh3.hash(f"g:{user}".encode(), 0, False) % 100 + 1
        ctx = {CONTEXT_KEY: from_sdk_context({"userId": user})}
        for p in (0, 1, 25, 50, 99, 100):
            assert flags[f"r{p}"].evaluate(ctx).value is (bucket <= p), (user, p, bucket)


def test_request_context_mapping() -> None:
    ctx = {"key": "42", "sessionId": "abc", "plan": "pro", "path": "/x", "appName": "web", "flag": True}
    unleash = from_request(ctx, app_name="default-app", environment="prod")
    assert (unleash.user_id, unleash.session_id, unleash.app_name, unleash.environment) == (
        "42",
        "abc",
        "web",
        "prod",
    )
    assert unleash.properties == {"plan": "pro", "path": "/x", "flag": "True"}
    assert unleash.current_time is not None and unleash.current_time.endswith("+00:00")


def test_cli_output_matches_the_sdk(features_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("UnleashClient")
    sys.path.insert(0, str(Path(__file__).parent))
    from unleash_corpus import Oracle

    contexts = [
        {"userId": "ann", "properties": {"plan": "pro"}, "currentTime": "2024-01-01T00:00:00Z"},
        {"userId": "bob", "currentTime": "2024-01-01T00:00:00Z"},
        {"sessionId": "s1", "plan": "pro", "currentTime": "2024-01-01T00:00:00Z"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in contexts))
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("flagproxy")),
            "eval",
            "--source",
            "unleash",
            "--flags",
            str(features_file),
            "--keys-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    oracle = Oracle(FEATURES)
    try:
        for line, context in zip(run.stdout.splitlines(), contexts, strict=True):
            got = json.loads(line)
            for name, answer in got["flags"].items():
                sdk: dict[str, Any] = oracle.answer(name, context)
                assert answer["enabled"] is sdk["enabled"]
                assert answer["variant"] == sdk["variant"]["name"]
                assert answer["payload"] == sdk["variant"].get("payload")
    finally:
        oracle.close()


def test_explanations_say_why_and_map_to_openfeature_reasons() -> None:
    broken = {"contextName": "v", "operator": "NUM_EQ", "value": "x"}  # breaks the grammar: always off
    body = {
        "features": [
            {"name": "off", "enabled": False, "strategies": []},
            {"name": "on", "enabled": True, "strategies": [{"name": "default"}]},
            {
                "name": "nobody",
                "enabled": True,
                "strategies": [{"name": "userWithId", "parameters": {"userIds": "x"}}],
            },
            {"name": "broken", "enabled": True, "strategies": [{"name": "default", "constraints": [broken]}]},
            {"name": "child", "enabled": True, "strategies": [], "dependencies": [{"feature": "off"}]},
        ]
    }
    texts = {f["name"]: json.dumps(f) for f in body["features"]}
    flags = DEFAULT.get("unleash").compile({"flags": texts}, {})[0]
    expected = {
        "off": ("disabled", "DISABLED"),
        "on": ("strategy matched", "TARGETING_MATCH"),
        "nobody": ("no strategy matched", "DEFAULT"),
        "broken": ("rule does not compile", "ERROR"),
        "child": ("dependency not met", "DEFAULT"),
    }
    for name, (reason, standard) in expected.items():
        _, why = flags[name].explain({"key": "u"})
        assert why["reason"] == reason, (name, why)
        reason_of = flags[name].reason_of
        assert reason_of is not None and reason_of(why) == standard
    assert "does not parse" in flags["broken"].explain({"key": "u"})[1]["error"]
