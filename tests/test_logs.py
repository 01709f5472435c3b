"""Structured logs: one JSON object per line (ours and uvicorn's, in every worker), the access log,
the request id in both, and the text format for people."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import httpx
from support import PYTHON, REPO, clean_env, close_without_reply, wait_for

from proxy.logs import JsonFormatter

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def events(stderr: str) -> list[dict]:
    """Every line must be one JSON object."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    parsed = []
    for line in lines:
        event = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(event, dict), line
        parsed.append(event)
    return parsed


def test_json_lines_from_uvicorn_and_the_proxy_with_an_access_log(proxy_factory, origin) -> None:
    proxy = proxy_factory([origin.url], args=["--access-log"], log_level="info")
    with httpx.Client() as client:
        generated = client.get(f"{proxy.base_url}/logged/a?secret=1", headers={"X-User-Id": "u1"})
        given = client.get(f"{proxy.base_url}/logged/b", headers={"X-Request-Id": "trace-42"})
        client.get(f"{proxy.base_url}/__flags/readyz")
    rid = generated.headers["x-request-id"]
    assert origin.only_request_to("/logged/a").value("X-Request-Id") == rid
    assert given.headers["x-request-id"] == "trace-42"

    def access_events() -> list[dict]:
        found = [e for e in events(proxy.stderr()) if e.get("event") == "request"]
        found = [e for e in found if e["path"] != "/__flags/healthz"]  # the start-up polling
        return found if len(found) == 3 else []

    access = wait_for(access_events, what="three access-log events")
    every = events(proxy.stderr())
    for event in every:
        assert {"ts", "level", "logger", "msg", "pid"} <= set(event), event
        assert TS.fullmatch(event["ts"]) and event["pid"] == proxy.pid
    loggers = {e["logger"] for e in every}
    assert "uvicorn.error" in loggers and "flagproxy" in loggers  # uvicorn's own lines are JSON too
    assert any("flagproxy ready" in e["msg"] for e in every)

    first, second, probe = access
    assert first["logger"] == "flagproxy.access" and first["level"] == "info"
    assert (first["method"], first["path"], first["status"], first["origin"]) == (
        "GET",
        "/logged/a",
        200,
        "/",
    )
    assert first["request_id"] == rid and first["client"] == "127.0.0.1"
    assert first["bytes_sent"] == len(generated.content) and first["duration_ms"] > 0
    assert "secret" not in json.dumps(first)  # the query string is not logged
    assert second["request_id"] == "trace-42"
    assert probe["path"] == "/__flags/readyz" and probe["status"] == 200 and probe["origin"] is None


def test_no_access_log_unless_asked_and_warnings_carry_the_request_id(proxy_factory, origin) -> None:
    origin.route("/gone", close_without_reply())
    proxy = proxy_factory([origin.url], log_level="info")
    assert httpx.get(f"{proxy.base_url}/gone", headers={"X-Request-Id": "lost-1"}).status_code == 502
    httpx.get(f"{proxy.base_url}/quiet")
    assert origin.only_request_to("/quiet")
    warning = wait_for(
        lambda: [e for e in events(proxy.stderr()) if e["msg"].startswith("upstream request failed")],
        what="the upstream warning",
    )
    assert warning[0]["level"] == "warning" and warning[0]["request_id"] == "lost-1"
    assert warning[0]["origin"] == "/" and warning[0]["logger"] == "flagproxy.forward"
    assert not [e for e in events(proxy.stderr()) if e.get("event") == "request"]


def test_text_format_and_settings_layers(proxy_factory, origin) -> None:
    text = proxy_factory([origin.url], args=["--log-format", "text"], log_level="info")
    lines = text.stderr().splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO flagproxy: flagproxy ready", ln) for ln in lines
    )

    from_env = proxy_factory(
        [origin.url],
        env={"FLAGPROXY_LOG_FORMAT": "text", "FLAGPROXY_LOG_ACCESS_LOG": "true"},
        log_level="info",
    )
    httpx.get(f"{from_env.base_url}/env-access")
    wait_for(lambda: "GET /env-access 200" in from_env.stderr(), what="a text access line")

    from_file = proxy_factory([origin.url], config='[log]\naccess_log = true\nlevel = "warning"\n')
    httpx.get(f"{from_file.base_url}/file-access")
    # level warning hides the startup lines, but the access log was asked for explicitly
    access = wait_for(lambda: [e for e in events(from_file.stderr()) if e.get("path") == "/file-access"])
    assert access[0]["status"] == 200
    assert not any("flagproxy ready" in e["msg"] for e in events(from_file.stderr()))


def test_bad_log_settings_are_config_errors(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[log]\nformat = "xml"\n')
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "serve", "--config", str(config), "--origin", "http://127.0.0.1:9"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "[log] format: expected json or text, got 'xml'" in result.stderr


def test_workers_log_json_too(redis_server, redis_namespace, proxy_factory, origin) -> None:
    proxy = proxy_factory(
        [origin.url],
        env={"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace},
        args=["--workers", "2", "--redis-url", redis_server.url],
        log_level="info",
    )
    ready = wait_for(
        lambda: {e["pid"] for e in events(proxy.stderr()) if "flagproxy ready" in e["msg"]} or None,
        what="both workers ready",
    )
    wait_for(lambda: len({e["pid"] for e in events(proxy.stderr()) if "flagproxy ready" in e["msg"]}) == 2)
    assert proxy.pid not in ready  # the lines come from the worker processes


def test_formatter_keeps_one_line_with_extras_and_tracebacks() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "flagproxy.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    record.request_id = "r-1"
    record.odd = object()  # anything not JSON is written as its str()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert event["msg"] == "failed here" and event["level"] == "error" and event["request_id"] == "r-1"
    assert "ValueError: boom\nsecond line" in event["exc"] and event["odd"].startswith("<object")
