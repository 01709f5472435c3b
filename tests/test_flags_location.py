"""Where the flags file is looked for, and ``serve`` refusing to start with no flags unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import REPO, run_serve

from proxy import config as config_module
from proxy.app import FlagProxy
from proxy.config import DEFAULT_FLAGS_FILE, ConfigError, load_settings
from proxy.server import refuse_empty

ORIGIN = ["http://127.0.0.1:9"]


def write_flags(path: Path, **enabled: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"flags": {k: {"enabled": v} for k, v in enabled.items()}}))
    return path


def test_a_relative_path_in_the_toml_file_is_relative_to_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_flags(tmp_path / "conf" / "seeds" / "mine.json", mine=True)
    toml = tmp_path / "conf" / "proxy.toml"
    toml.write_text('[store]\nflags_file = "seeds/mine.json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # started from anywhere
    settings = load_settings(config_file=toml, env={}, origins=ORIGIN)
    assert Path(settings.store.flags_file) == tmp_path / "conf" / "seeds" / "mine.json"
    assert set(FlagProxy(settings).store.snapshot.flags) == {"mine"}


def test_the_command_line_and_environment_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_flags(tmp_path / "conf" / "f.json", beside=True)
    write_flags(tmp_path / "f.json", cwd=True)
    toml = tmp_path / "conf" / "proxy.toml"
    toml.write_text('[store]\nflags_file = "f.json"\n')
    monkeypatch.chdir(tmp_path)
    by_cli = load_settings(
        config_file=toml, env={}, overrides={"store": {"flags_file": "f.json"}}, origins=ORIGIN
    )
    assert by_cli.store.flags_file == "f.json"  # relative to the cwd, as typed
    by_env = load_settings(config_file=toml, env={"FLAGPROXY_STORE_FLAGS_FILE": "./f.json"}, origins=ORIGIN)
    assert by_env.store.flags_file == "./f.json"
    by_file = load_settings(config_file=toml, env={}, origins=ORIGIN)
    assert Path(by_file.store.flags_file) == tmp_path / "conf" / "f.json"


def test_an_older_toml_path_relative_to_the_cwd_still_works_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_flags(tmp_path / "seeds" / "old.json", old=True)
    toml = tmp_path / "config" / "proxy.toml"
    toml.parent.mkdir()
    toml.write_text('[store]\nflags_file = "seeds/old.json"\n')  # meant from the checkout's root
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config_file=toml, env={}, origins=ORIGIN)
    assert settings.store.flags_file == "seeds/old.json"
    assert "'../seeds/old.json'" in caplog.text  # the warning says what to write instead


def test_the_default_seeds_are_found_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no seeds/ here
    settings = load_settings(env={}, origins=ORIGIN)
    assert Path(settings.store.flags_file) == REPO / DEFAULT_FLAGS_FILE
    assert "starter_pack_price" in FlagProxy(settings).store.snapshot.flags


def test_no_flags_found_is_refused_saying_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked = [tmp_path / "a" / DEFAULT_FLAGS_FILE, tmp_path / "b" / DEFAULT_FLAGS_FILE]
    monkeypatch.setattr(config_module, "default_flags_candidates", lambda: looked)
    monkeypatch.setattr("proxy.server.default_flags_candidates", lambda: looked)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={}, origins=ORIGIN)
    assert settings.store.flags_file == DEFAULT_FLAGS_FILE
    app = FlagProxy(settings)
    assert app.store.snapshot.flags == {}
    with pytest.raises(ConfigError) as refused:
        refuse_empty(settings, app)
    message = str(refused.value)
    assert all(str(p) in message for p in looked) and "--allow-empty" in message and "--flags" in message
    allowed = load_settings(env={"FLAGPROXY_STORE_ALLOW_EMPTY": "true"}, origins=ORIGIN)
    refuse_empty(allowed, FlagProxy(allowed))  # asked for: no error


def test_serve_refuses_an_empty_flags_file_and_starts_with_allow_empty(tmp_path: Path) -> None:
    empty = write_flags(tmp_path / "empty.json")
    done = run_serve(["--origin", ORIGIN[0], "--port", "1", "--flags", str(empty)])
    assert done.returncode == 2
    assert f"the flags file {empty} has no flags" in done.stderr and "--allow-empty" in done.stderr
    missing = run_serve(["--origin", ORIGIN[0], "--port", "1", "--flags", str(tmp_path / "nope.json")])
    assert missing.returncode == 2 and "nope.json" in missing.stderr


def test_an_empty_start_is_fine_when_a_vendor_sync_or_redis_brings_the_flags(tmp_path: Path) -> None:
    empty = str(write_flags(tmp_path / "empty.json"))
    for env in (
        {"FLAGPROXY_SPLIT_SDK_KEY": "sdk-key-abcdefgh"},
        {"FLAGPROXY_STORE_REDIS_URL": "redis://127.0.0.1:1"},
    ):
        settings = load_settings(env=env, overrides={"store": {"flags_file": empty}}, origins=ORIGIN)
        refuse_empty(settings, FlagProxy(settings))


def test_a_toml_naming_the_default_path_means_the_file_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spelled like the default, but written: the file next to the TOML, not the checkout's seeds."""
    write_flags(tmp_path / "conf" / "seeds" / "flags.json", own=True)
    toml = tmp_path / "conf" / "x.toml"
    toml.write_text(f'[store]\nflags_file = "{DEFAULT_FLAGS_FILE}"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config_file=toml, env={}, origins=ORIGIN)
    assert Path(settings.store.flags_file) == tmp_path / "conf" / "seeds" / "flags.json"
    assert set(FlagProxy(settings).store.snapshot.flags) == {"own"}
