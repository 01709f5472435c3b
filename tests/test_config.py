"""Settings layers: defaults < file < env < CLI, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_settings, parse_origin_spec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flagproxy.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_layer() -> None:
    s = load_settings(env={})
    assert s.server.port == 8080
    assert s.header.limit_bytes == 10240
    assert s.header.reserve_bytes == 512
    assert s.server.control_prefix == "/__flags"
    assert s.origins == ()


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[server]\nport = 8001\nhost = '127.0.0.2'\n[header]\nlimit_bytes = 9000\n")
    env = {"FLAGPROXY_SERVER_PORT": "8002", "FLAGPROXY_HEADER_ALERT_RATIO": "0.5"}
    s = load_settings(config_file=cfg, env=env, overrides={"server": {"port": 8003, "host": None}})
    assert s.server.port == 8003  # CLI beats env and file
    assert s.server.host == "127.0.0.2"  # file beats default; CLI None means "not given"
    assert s.header.limit_bytes == 9000  # file
    assert s.header.alert_ratio == 0.5  # env


def test_env_overrides_every_section_key(tmp_path: Path) -> None:
    env = {
        "FLAGPROXY_HEADER_LIMIT_BYTES": "4096",
        "FLAGPROXY_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1/32",
        "FLAGPROXY_PROXY_REWRITE_HOST": "yes",
        "FLAGPROXY_UPSTREAM_READ_TIMEOUT_S": "2.5",
        "FLAGPROXY_CONTEXT_KEY_HEADER": "X-Account",
    }
    s = load_settings(env=env)
    assert s.header.limit_bytes == 4096
    assert s.proxy.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert s.proxy.rewrite_host is True
    assert s.upstream.read_timeout_s == 2.5
    assert s.context.key_header == "X-Account"


def test_origins_layers_replace_whole_list(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[[origins]]\nprefix='/a'\nurl='http://127.0.0.1:1'\nstrip_prefix=true\n")
    s = load_settings(config_file=cfg, env={})
    assert [(o.prefix, o.url, o.strip_prefix) for o in s.origins] == [("/a", "http://127.0.0.1:1", True)]
    s = load_settings(config_file=cfg, env={"FLAGPROXY_ORIGINS": "/b=http://127.0.0.1:2,http://127.0.0.1:3"})
    assert [(o.prefix, o.url) for o in s.origins] == [
        ("/b", "http://127.0.0.1:2"),
        ("/", "http://127.0.0.1:3"),
    ]
    s = load_settings(config_file=cfg, env={}, origins=["http://127.0.0.1:4"])
    assert [(o.prefix, o.url) for o in s.origins] == [("/", "http://127.0.0.1:4")]


def test_origin_spec_without_prefix_keeps_url_with_equals() -> None:
    o = parse_origin_spec("http://127.0.0.1:9000/x?=1")
    assert o.prefix == "/" and o.url == "http://127.0.0.1:9000/x?=1"
    o = parse_origin_spec("/api=http://127.0.0.1:9000")
    assert o.prefix == "/api" and o.url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[header]\nlimit_bytes = 'big'\n", {}, "[header] limit_bytes"),
        ("", {"FLAGPROXY_HEADER_LIMIT_BYTES": "abc"}, "FLAGPROXY_HEADER_LIMIT_BYTES"),
        ("[server]\nport = 70000\n", {}, "[server] port"),
        ("[server]\nbogus = 1\n", {}, "[server] bogus: unknown setting"),
        ("[nosuch]\nx = 1\n", {}, "[nosuch]: unknown section"),
        ("[proxy]\ntrusted_proxies = ['not-a-cidr']\n", {}, "trusted_proxies"),
        ("[header]\nreserve_bytes = 20000\n", {}, "reserve_bytes"),
        ("[header]\nalert_ratio = 1.5\n", {}, "alert_ratio"),
        ("[header]\nname = 'bad name'\n", {}, "[header] name"),
        ("[[origins]]\nurl = 'ftp://x'\n", {}, "http:// or https://"),
        ("[[origins]]\nprefix = '/x'\n", {}, "url: missing"),
        ("[[origins]]\nprefix = '/__flags/x'\nurl = 'http://127.0.0.1:1'\n", {}, "reserved control prefix"),
        ("[upstream]\nread_timeout_s = 0\n", {}, "read_timeout_s"),
        ("[server\n", {}, "invalid TOML"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, toml: str, env: dict[str, str], needle: str) -> None:
    cfg = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=cfg, env=env)
    assert needle in str(info.value)


def test_example_configs_load() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("flagproxy.toml", "demo.toml"):
        s = load_settings(config_file=root / "config" / name, env={})
        assert s.origins, name


def test_example_config_shows_every_setting() -> None:
    """config/flagproxy.toml is the settings reference: every section and key is in it."""
    import tomllib

    from proxy.config import all_sections, setting_names

    with open(Path(__file__).resolve().parent.parent / "config" / "flagproxy.toml", "rb") as fh:
        example = tomllib.load(fh)

    def listed(table: dict[str, Any], dotted: str) -> bool:
        *tables, key = dotted.split(".")
        for name in tables:
            table = table.get(name, {})
        return key in table

    missing = [
        f"[{section}] {name}"
        for section, kind in all_sections().items()
        for name in setting_names(kind)
        if not listed(example.get(section, {}), name)
    ]
    assert "[chat] slack.signing_secret" in [f"[chat] {n}" for n in setting_names(all_sections()["chat"])]
    assert missing == []


def test_nested_sections_from_file_and_environment(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "[chat]\ntimeout_s = 3\n[chat.slack]\nsigning_secret = 'from-file'\nallowed_users = ['U1']\n"
        "[chat.telegram]\nsecret_token = 'tok'\nbot_token = '1:x'\n",
    )
    env = {
        "FLAGPROXY_CHAT_SLACK_SIGNING_SECRET": "from-env",
        "FLAGPROXY_CHAT_TELEGRAM_ALLOWED_USERS": "42, 43",
        "FLAGPROXY_CHAT_MAX_PENDING": "7",
    }
    s = load_settings(config_file=cfg, env=env)
    assert s.chat.timeout_s == 3.0 and s.chat.max_pending == 7
    assert s.chat.slack.signing_secret == "from-env"  # env beats file
    assert s.chat.slack.allowed_users == ("U1",)  # the file's, untouched by other env keys
    assert s.chat.telegram.allowed_users == ("42", "43")
    assert s.chat.telegram.secret_token == "tok"


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[chat.slack]\nbogus = 1\n", {}, "[chat.slack] bogus: unknown setting"),
        ("[chat]\nslack = 1\n", {}, "[chat.slack]: expected a table"),
        ("[chat.slack]\nreply_within_s = 5\n", {}, "[chat.slack] reply_within_s"),
        ("", {"FLAGPROXY_CHAT_SLACK_REPLY_WITHIN_S": "x"}, "FLAGPROXY_CHAT_SLACK_REPLY_WITHIN_S"),
        ("[chat.telegram]\nsecret_token = 'a b'\nbot_token = 'x'\n", {}, "[chat.telegram] secret_token"),
        ("[chat.telegram]\nsecret_token = 'ab'\n", {}, "[chat.telegram] bot_token"),
    ],
)
def test_bad_nested_settings_name_the_field(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=write(tmp_path, toml), env=env)
    assert needle in str(info.value)


def test_cli_exits_2_with_message_naming_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[header]\nlimit_bytes = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), "--origin", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "limit_bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_requires_an_origin() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"], capture_output=True, text=True, timeout=30, env={"PATH": ""}
    )
    assert result.returncode == 2
    assert "origin" in result.stderr
