"""Reload without restart, end to end: the flags file watched, SIGHUP re-reading the settings.

Each test runs a real ``flagproxy serve`` in front of a raw origin that records what it received,
edits files the way editors and Kubernetes do, and waits for the proxy's own log line or for the
origin to see the new value (bounded), never for a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import LOCALHOST, ProxyProcess, RawOrigin, RedisServer, http_response, read_response

Flags = dict[str, Any]


def flags_doc(**enabled: bool) -> Flags:
    return {"flags": {key: {"enabled": on} for key, on in enabled.items()}}


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)  # polling a subprocess's observable state, bounded by the deadline


def header_of(proxy: ProxyProcess, origin: RawOrigin, path: str) -> Any:
    """The X-Feature-Flags the origin receives for a fresh request to ``path``."""
    before = len(origin.requests_to(path))
    response = httpx.get(proxy.base_url + path, headers={"X-User-Id": "u1"}, timeout=5)
    assert response.status_code == 200, response.text
    seen = origin.requests_to(path)[before:]
    value = seen[-1].value("x-feature-flags")
    return json.loads(value) if value else None


def write_atomically(path: Path, text: str) -> None:
    """As editors save: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_count(proxy: ProxyProcess, needle: str) -> int:
    return proxy.stderr().count(needle)


@pytest.fixture
def echo_origin(origin_factory: Callable[..., RawOrigin]) -> RawOrigin:
    origin = origin_factory()
    origin.route("/", http_response(200, [("Content-Type", "text/plain")], b"ok"))
    return origin


def test_an_edited_flags_file_is_applied_and_a_broken_one_is_refused(
    echo_origin: RawOrigin, tmp_path: Path
) -> None:
    with ProxyProcess(
        [echo_origin.url], flags=flags_doc(a=False, b=True), log_level="info", tmp_dir=tmp_path
    ) as proxy:
        flags_file = tmp_path / "flags.json"
        assert header_of(proxy, echo_origin, "/w1") == {"a": False, "b": True}

        write_atomically(flags_file, json.dumps(flags_doc(a=True, b=True)))  # rename over it
        eventually(lambda: header_of(proxy, echo_origin, "/w2") == {"a": True, "b": True}, what="rename")

        flags_file.write_text(json.dumps(flags_doc(a=True)))  # rewritten in place; b removed
        eventually(lambda: header_of(proxy, echo_origin, "/w3") == {"a": True}, what="in place")
        assert "actor=file flag=b" in proxy.stderr()  # every change logged with its actor

        flags_file.write_text('{"flags": {"a": {"enabled": "yes"}}}')  # invalid: rejected whole
        eventually(lambda: log_count(proxy, "rejected, keeping the last good flags") == 1, what="rejection")
        assert "flags.a.enabled" in proxy.stderr()  # the log line names the field
        flags_file.write_text('{"flags": ')  # not JSON
        eventually(lambda: log_count(proxy, "rejected, keeping the last good flags") == 2, what="bad JSON")
        assert header_of(proxy, echo_origin, "/w4") == {"a": True}  # the last good state serves

        flags_file.write_text(json.dumps(flags_doc(a=False, c=True)))  # good again: applied
        eventually(lambda: header_of(proxy, echo_origin, "/w5") == {"a": False, "c": True}, what="recovery")


def test_an_edit_applies_even_when_the_flag_keeps_its_updatedAt(
    echo_origin: RawOrigin, tmp_path: Path
) -> None:
    stamped: Flags = {"flags": {"a": {"enabled": False, "updatedAt": "2025-01-01T00:00:00.000Z"}}}
    with ProxyProcess([echo_origin.url], flags=stamped, log_level="info", tmp_dir=tmp_path) as proxy:
        stamped["flags"]["a"]["enabled"] = True
        (tmp_path / "flags.json").write_text(json.dumps(stamped))
        eventually(lambda: header_of(proxy, echo_origin, "/s1") == {"a": True}, what="same updatedAt")


def test_a_kubernetes_configmap_swap_is_seen(echo_origin: RawOrigin, tmp_path: Path) -> None:
    """A ConfigMap volume: flags.json → ..data/flags.json, ..data → a timestamped directory that an
    update replaces by renaming a new symlink over ..data."""
    mount = tmp_path / "mount"
    first = mount / "..2026_12_01_1"
    first.mkdir(parents=True)
    (first / "flags.json").write_text(json.dumps(flags_doc(a=False)))
    (mount / "..data").symlink_to(first.name)
    (mount / "flags.json").symlink_to("..data/flags.json")
    proxy = ProxyProcess(
        [echo_origin.url], flags=flags_doc(z=True), args=["--flags", str(mount / "flags.json")]
    )
    with proxy:
        assert header_of(proxy, echo_origin, "/k1") == {"a": False}
        second = mount / "..2026_12_01_2"
        second.mkdir()
        (second / "flags.json").write_text(json.dumps(flags_doc(a=True)))
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        eventually(lambda: header_of(proxy, echo_origin, "/k2") == {"a": True}, what="configmap swap")


def test_without_watching_an_edit_waits_for_sighup(echo_origin: RawOrigin, tmp_path: Path) -> None:
    env = {"FLAGPROXY_STORE_WATCH_FLAGS_FILE": "false"}
    proxy = ProxyProcess(
        [echo_origin.url], flags=flags_doc(a=False), env=env, log_level="info", tmp_dir=tmp_path
    )
    with proxy:
        (tmp_path / "flags.json").write_text(json.dumps(flags_doc(a=True)))
        # a watch would apply it within its 200 ms debounce; the proxy is asked twice after that
        time.sleep(1.0)  # proving an absence takes a wait: nothing would signal "did not happen"
        assert header_of(proxy, echo_origin, "/off") == {"a": False}
        assert "flags file" not in proxy.stderr()
        proxy.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        eventually(lambda: header_of(proxy, echo_origin, "/on") == {"a": True}, what="SIGHUP re-read")
        assert "reloaded: applied" in proxy.stderr()


SETTINGS = """
[server]
header_timeout_s = 30

[header]
limit_bytes = {port}

[admin]
token = "{token}"

[[origins]]
url = "{origin}"

[[client_keys]]
name = "game"
key = "{client_key}"
"""


def settings_text(
    port: int, origin: str, token: str = "first-admin-token-1", client_key: str = "first-client-key-123"
) -> str:
    return SETTINGS.format(port=port, origin=origin, token=token, client_key=client_key)


@pytest.fixture
def two_origins(origin_factory: Callable[..., RawOrigin]) -> tuple[RawOrigin, RawOrigin]:
    """Two origins that say which one answered (X-Origin: first / second)."""
    first, second = origin_factory(), origin_factory()
    first.route("/", http_response(200, [("X-Origin", "first")], b"first"))
    second.route("/", http_response(200, [("X-Origin", "second")], b"second"))
    return first, second


def configured_proxy(origin: RawOrigin, tmp_path: Path, args: tuple[str, ...] = ()) -> ProxyProcess:
    """A proxy whose origin, admin token and client key come from its TOML file (not the command line)."""
    proxy = ProxyProcess(flags=flags_doc(a=True), log_level="info", tmp_dir=tmp_path, args=args)
    proxy.config = settings_text(10240, origin.url)
    return proxy


def sighup_and_wait(proxy: ProxyProcess, needle: str) -> None:
    before = log_count(proxy, needle)
    proxy.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    eventually(lambda: log_count(proxy, needle) > before, what=needle)


def test_sighup_changes_origins_keys_and_tokens_without_dropping_connections(
    two_origins: tuple[RawOrigin, RawOrigin], tmp_path: Path
) -> None:
    first, second = two_origins
    with configured_proxy(first, tmp_path) as proxy:
        config = tmp_path / "flagproxy.toml"
        kept = socket.create_connection(
            (LOCALHOST, proxy.port), timeout=5
        )  # keep-alive, open across the reload
        kept.sendall(b"GET /k HTTP/1.1\r\nHost: p\r\n\r\n")
        assert read_response(kept).value("x-origin") == "first"
        old_auth = {"Authorization": "Bearer first-admin-token-1"}
        assert httpx.get(proxy.base_url + "/__flags/api/flags", headers=old_auth).status_code == 200

        config.write_text(
            settings_text(9000, second.url, token="second-admin-token-2", client_key="second-client-key-45")
        )
        sighup_and_wait(proxy, "settings reloaded")
        line = next(x for x in proxy.stderr().splitlines() if "settings reloaded" in x)
        assert "[[origins]]" in line and "[admin]" in line and "[[client_keys]]" in line
        assert "needs a restart" in line and "[header]" in line  # named, and kept

        assert httpx.get(proxy.base_url + "/x").headers["x-origin"] == "second"  # new connections
        kept.sendall(b"GET /k HTTP/1.1\r\nHost: p\r\n\r\n")  # the old connection still works
        assert read_response(kept).status == 200
        kept.close()
        assert httpx.get(proxy.base_url + "/__flags/api/flags", headers=old_auth).status_code == 401
        new_auth = {"Authorization": "Bearer second-admin-token-2"}
        assert httpx.get(proxy.base_url + "/__flags/api/flags", headers=new_auth).status_code == 200
        client_path = "/__flags/client/v1/flags?key=u1"
        assert (
            httpx.get(proxy.base_url + client_path, headers={"X-API-Key": "first-client-key-123"}).status_code
            == 401
        )
        got = httpx.get(proxy.base_url + client_path, headers={"X-API-Key": "second-client-key-45"})
        assert got.status_code == 200 and got.json()["flags"] == {"a": True}


def test_sighup_with_bad_settings_changes_nothing(
    two_origins: tuple[RawOrigin, RawOrigin], tmp_path: Path
) -> None:
    first, second = two_origins
    with configured_proxy(first, tmp_path) as proxy:
        config = tmp_path / "flagproxy.toml"
        for broken in (
            settings_text(10240, second.url) + "\nnonsense = \n",  # not TOML
            settings_text(10240, second.url).replace("header_timeout_s = 30", "header_timeout_s = -1"),
            settings_text(10240, second.url) + '\n[[goals]]\nname = "g"\npath = "/x"\nstatus = "7xx"\n',
        ):
            config.write_text(broken)
            sighup_and_wait(proxy, "reload refused, nothing changed")
            assert httpx.get(proxy.base_url + "/x").headers["x-origin"] == "first"
        assert proxy.process is not None and proxy.process.poll() is None  # SIGHUP no longer kills it


def test_sighup_reaches_every_worker(
    two_origins: tuple[RawOrigin, RawOrigin], tmp_path: Path, redis_server: RedisServer, redis_namespace: str
) -> None:
    first, second = two_origins
    proxy = configured_proxy(first, tmp_path, ("--workers", "2", "--redis-url", redis_server.url))
    proxy.env = {"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace}
    with proxy:
        config = tmp_path / "flagproxy.toml"
        config.write_text(settings_text(10240, second.url) + "\nnonsense = \n")
        sighup_and_wait(proxy, "reload refused, the workers keep running")
        assert {httpx.get(proxy.base_url + f"/b{i}").headers["x-origin"] for i in range(6)} == {"first"}

        config.write_text(settings_text(9000, second.url))
        sighup_and_wait(proxy, "replacing the workers one at a time")
        line = next(x for x in proxy.stderr().splitlines() if "replacing the workers" in x)
        assert "[[origins]]" in line and "[header]" in line and "restart" not in line  # workers take all
        failures: list[int] = []

        def all_second() -> bool:
            answers = [httpx.get(proxy.base_url + f"/r{i}") for i in range(6)]
            failures.extend(r.status_code for r in answers if r.status_code >= 500)
            return {r.headers.get("x-origin") for r in answers} == {"second"}

        eventually(all_second, timeout=60, what="both workers replaced")
        assert failures == []  # no request failed while the workers were replaced


def test_sighup_with_workers_on_the_memory_store_keeps_their_changes(
    two_origins: tuple[RawOrigin, RawOrigin], tmp_path: Path
) -> None:
    """Each worker's memory store holds its own changes: replacing the workers would lose them."""
    first, second = two_origins
    with configured_proxy(first, tmp_path, ("--workers", "2")) as proxy:
        auth = {"Authorization": "Bearer first-admin-token-1"}
        killed = httpx.post(proxy.base_url + "/__flags/api/flags/a/kill", headers=auth)
        assert killed.status_code == 200, killed.text
        (tmp_path / "flagproxy.toml").write_text(settings_text(10240, second.url))
        sighup_and_wait(proxy, "reload refused: with --workers on the memory store")
        answers = [httpx.get(proxy.base_url + "/__flags/api/flags/a", headers=auth) for _ in range(10)]
        assert all(a.status_code == 200 for a in answers)
        # the kill survives where it was taken (replaced workers would all have forgotten it)
        assert any(a.json().get("override") is not None for a in answers), [a.text for a in answers]
        assert {httpx.get(proxy.base_url + f"/m{i}").headers["x-origin"] for i in range(4)} == {"first"}


def test_a_file_edit_changes_only_what_it_edited(
    echo_origin: RawOrigin, tmp_path: Path, redis_server: RedisServer, redis_namespace: str
) -> None:
    """Two instances on one Redis, each with its own copy of the file (pods seeing a ConfigMap at
    different times): a flag created through the admin API survives both seeing the edit."""
    env = {"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace, "FLAGPROXY_ADMIN_TOKEN": "admin-token-abcdefgh"}
    auth = {"Authorization": "Bearer admin-token-abcdefgh"}
    args = ("--redis-url", redis_server.url)
    start = flags_doc(a=False)
    one = ProxyProcess(
        [echo_origin.url], flags=start, env=env, args=args, log_level="info", tmp_dir=tmp_path / "one"
    )
    two = ProxyProcess(
        [echo_origin.url], flags=start, env=env, args=args, log_level="info", tmp_dir=tmp_path / "two"
    )
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with one, two:
        created = httpx.put(one.base_url + "/__flags/api/flags/hotfix", json={"enabled": True}, headers=auth)
        assert created.status_code in (200, 201), created.text
        edited = json.dumps(flags_doc(a=True, b=True))
        (tmp_path / "one" / "flags.json").write_text(edited)
        eventually(lambda: "reloaded: applied" in one.stderr(), what="first instance applies")
        (tmp_path / "two" / "flags.json").write_text(edited)
        eventually(lambda: "flags file" in two.stderr() and "reloaded" in two.stderr(), what="second")
        for proxy in (one, two):
            eventually(
                lambda p=proxy: header_of(p, echo_origin, "/e") == {"a": True, "b": True, "hotfix": True}
            )


def test_a_versioned_file_keeps_applying(echo_origin: RawOrigin, tmp_path: Path) -> None:
    versioned = {**flags_doc(a=False), "version": 5}
    with ProxyProcess([echo_origin.url], flags=versioned, log_level="info", tmp_dir=tmp_path) as proxy:
        for n, on in enumerate((True, False, True)):
            document: Flags = {**flags_doc(a=on), "version": 5}  # the version left as it was
            if n == 2:
                document.pop("version")
            (tmp_path / "flags.json").write_text(json.dumps(document))
            eventually(
                lambda on=on, n=n: header_of(proxy, echo_origin, f"/v{n}") == {"a": on}, what=f"edit {n}"
            )


def test_live_update_streams_stay_open_across_an_unrelated_reload(
    echo_origin: RawOrigin, tmp_path: Path
) -> None:
    proxy = configured_proxy(echo_origin, tmp_path)
    with proxy:
        key = {"X-API-Key": "first-client-key-123"}
        bulk = httpx.post(
            proxy.base_url + "/__flags/ofrep/v1/evaluate/flags", json={"context": {}}, headers=key
        )
        uri = (
            bulk.json()["metadata"]["eventStreams"][0]["endpoint"]["requestUri"]
            if "metadata" in bulk.json()
            else None
        )
        uri = uri or bulk.json()["eventStreams"][0]["endpoint"]["requestUri"]
        with httpx.stream("GET", proxy.base_url + uri, timeout=10) as stream:
            lines = stream.iter_lines()
            (tmp_path / "flagproxy.toml").write_text(
                settings_text(10240, echo_origin.url) + "\n[upstream]\npool_limit = 7\n"
            )
            sighup_and_wait(proxy, "settings reloaded")
            auth = {"Authorization": "Bearer first-admin-token-1"}
            assert httpx.post(proxy.base_url + "/__flags/api/flags/a/kill", headers=auth).status_code == 200
            seen = next((line for line in lines if "refetchEvaluation" in line), None)
            assert seen is not None  # the change arrived on the stream opened before the reload


def test_a_recreated_directory_and_an_edit_behind_a_symlink_are_seen(
    echo_origin: RawOrigin, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "flags.json").write_text(json.dumps(flags_doc(a=False)))
    link_dir = tmp_path / "link"
    link_dir.mkdir()
    (link_dir / "flags.json").symlink_to(real / "flags.json")
    proxy = ProxyProcess(
        [echo_origin.url], flags=flags_doc(z=True), args=["--flags", str(link_dir / "flags.json")]
    )
    with proxy:
        assert header_of(proxy, echo_origin, "/l0") == {"a": False}
        (real / "flags.json").write_text(json.dumps(flags_doc(a=True)))  # in place, behind the link
        eventually(lambda: header_of(proxy, echo_origin, "/l1") == {"a": True}, what="symlink target edit")
        shutil.rmtree(link_dir)  # the watched directory goes, and comes back
        link_dir.mkdir()
        (link_dir / "flags.json").write_text(json.dumps(flags_doc(a=False, c=True)))
        eventually(
            lambda: header_of(proxy, echo_origin, "/l2") == {"a": False, "c": True}, what="recreated dir"
        )


def test_an_edit_during_a_redis_outage_is_applied_when_redis_is_back(
    echo_origin: RawOrigin, tmp_path: Path, fresh_redis: RedisServer
) -> None:
    args = ("--redis-url", fresh_redis.url)
    with ProxyProcess(
        [echo_origin.url], flags=flags_doc(a=False), args=args, log_level="info", tmp_dir=tmp_path
    ) as proxy:
        assert header_of(proxy, echo_origin, "/o0") == {"a": False}
        fresh_redis.kill()
        (tmp_path / "flags.json").write_text(json.dumps(flags_doc(a=True)))
        eventually(lambda: "not applied yet" in proxy.stderr(), what="the write refused")
        fresh_redis.start()
        eventually(lambda: header_of(proxy, echo_origin, "/o1") == {"a": True}, timeout=20, what="retried")
        assert proxy.stderr().count("not applied yet") == 1  # one line for the outage, not one per try
