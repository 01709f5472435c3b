"""A throwaway source, added the way docs/architecture.md says: its own code and a registry entry.

"toy" stores ``key → "on"/"off"`` items, has a ``[toy]`` settings section (environment variables
included), a webhook under ``/__flags/webhooks/toy`` and a background sync; nothing of the proxy is
changed for it. The proxy serves its flags end to end, with the documented precedence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from support import InProcessProxy, RawOrigin, free_port, wait_for

from proxy.app import FlagProxy
from proxy.config import ConfigError, load_settings
from proxy.control.bodies import read_json
from proxy.control.deps import deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import apply, counted, result_response
from proxy.engine import Flag, compile_flag
from proxy.sources.base import Compiled, Sync, SyncContext
from proxy.sources.registry import SOURCES, Registry
from proxy.store.change import Change, stored_text


@dataclass(frozen=True)
class ToySettings:
    token: str = ""
    pulled_key: str = "from-sync"

    def validate(self) -> None:
        if self.pulled_key.strip() != self.pulled_key or not self.pulled_key:
            raise ConfigError("[toy] pulled_key: must be a non-empty word")


def toy_flag(key: str, state: str) -> Flag:
    return compile_flag(key, {"enabled": state == "on"})


class ToySync:
    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.triggered = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return True

    async def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        await self.triggered.wait()
        key = self.context.section.pulled_key
        await self.context.store.apply(
            Change(source="toy", upsert={key: stored_text("on")}, actor="toy-sync")
        )
        self.context.metrics.source_synced("toy", ok=True)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def trigger(self) -> None:
        self.triggered.set()


@counted("toy")
async def toy_webhook(request: Request) -> Response:
    deps = deps_of(request)
    settings: ToySettings = deps.settings.section("toy")
    if request.query_params.get("token") != settings.token:
        raise HTTPProblem(401, "bad_token", "wrong toy token")
    body = await read_json(request, deps.settings.webhooks.max_body_bytes)
    if body == "pull":
        deps.syncs["toy"].trigger()
        return JSONResponse({"status": "accepted"}, 202)
    if not isinstance(body, dict) or not all(v in ("on", "off") for v in body.values()):
        raise HTTPProblem(422, "invalid_payload", 'expected {"key": "on" | "off"}')
    change = Change(source="toy", upsert={k: stored_text(v) for k, v in body.items()}, actor="webhook:toy")
    result = await apply(deps.store, change)
    request.state.outcome = result.status
    return result_response(result, 202)


class ToySource:
    name: str = "toy"
    kinds: tuple[str, ...] = ("flags",)
    settings_type: type | None = ToySettings

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        flags, problems = {}, {}
        for key, text in kinds.get("flags", {}).items():
            state = json.loads(text)
            if state in ("on", "off"):
                flags[key] = toy_flag(key, state)
            else:
                problems[key] = f"not on/off: {state!r}"
        return flags, problems

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        pairs = (line.split("=", 1) for line in Path(path).read_text().splitlines() if "=" in line)
        return {key.strip(): toy_flag(key.strip(), state.strip()) for key, state in pairs}

    def sync(self, context: SyncContext) -> Sync | None:
        return ToySync(context)

    def webhook_routes(self) -> list[BaseRoute]:
        return [Route("/toy", toy_webhook, methods=["POST"])]


REGISTRY = Registry([*SOURCES, ToySource()])  # "the registry line"


@pytest.fixture
def toy_proxy(origin: RawOrigin, tmp_path: Path) -> Iterator[InProcessProxy]:
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"flags": {"shared": {"enabled": False}, "native-only": {"enabled": True}}}))
    env = {
        "FLAGPROXY_STORE_FLAGS_FILE": str(flags),
        "FLAGPROXY_STORE_SOURCES": "split,native,toy",  # toy wins keys it shares with native
        "FLAGPROXY_TOY_TOKEN": "t0k",
        "FLAGPROXY_ADMIN_TOKEN": "adm",
    }
    settings = load_settings(env=env, origins=[origin.url], plugins=REGISTRY.settings_sections())
    with InProcessProxy(FlagProxy(settings, registry=REGISTRY), free_port()) as proxy:
        yield proxy


def served(proxy: InProcessProxy, origin: RawOrigin, path: str) -> dict[str, Any]:
    assert httpx.get(f"{proxy.url}{path}", headers={"X-User-Id": "u"}).status_code == 200
    return dict(json.loads(origin.only_request_to(path).value("X-Feature-Flags") or "{}"))


def test_a_new_source_is_served_end_to_end(toy_proxy: InProcessProxy, origin: RawOrigin) -> None:
    base = f"{toy_proxy.url}/__flags/webhooks/toy?token=t0k"
    assert served(toy_proxy, origin, "/toy/0") == {"shared": False, "native-only": True}

    response = httpx.post(base, json={"shared": "on", "toy-only": "off"})
    assert response.status_code == 202, response.text
    assert served(toy_proxy, origin, "/toy/1") == {"shared": True, "native-only": True, "toy-only": False}

    refused = httpx.post(base, json={"shared": "maybe"})
    assert (refused.status_code, refused.json()["error"]) == (422, "invalid_payload")
    assert httpx.post(base.replace("t0k", "nope"), json={"x": "on"}).status_code == 401
    assert served(toy_proxy, origin, "/toy/2")["shared"] is True  # nothing changed

    assert httpx.post(base, json="pull").status_code == 202
    wait_for(lambda: "from-sync" in toy_proxy.app.store.snapshot.flags, what="the sync's write")
    assert served(toy_proxy, origin, "/toy/3")["from-sync"] is True

    listed = httpx.get(f"{toy_proxy.url}/__flags/api/flags/shared", headers={"Authorization": "Bearer adm"})
    assert listed.json()["source"] == "toy"
    metrics = toy_proxy.app.metrics.registry
    assert metrics.get_sample_value("flagproxy_source_syncs_total", {"source": "toy", "result": "ok"}) == 1
    webhooks = {"source": "toy", "result": "invalid_payload"}
    assert metrics.get_sample_value("flagproxy_webhooks_total", webhooks) == 1


def test_its_settings_section_and_file_format_come_with_it(tmp_path: Path) -> None:
    settings = load_settings(env={"FLAGPROXY_TOY_PULLED_KEY": "pulled"}, plugins=REGISTRY.settings_sections())
    assert settings.section("toy") == ToySettings(pulled_key="pulled")
    with pytest.raises(ConfigError, match=r"\[toy\] pulled_key"):
        load_settings(env={"FLAGPROXY_TOY_PULLED_KEY": " "}, plugins=REGISTRY.settings_sections())
    with pytest.raises(ConfigError, match=r"\[toy\]: unknown section"):
        config = tmp_path / "c.toml"
        config.write_text("[toy]\ntoken = 'x'\n")
        load_settings(config_file=config, env={})  # the default registry has no toy source
    listing = tmp_path / "flags.toy"
    listing.write_text("a = on\nb = off\n")
    flags = REGISTRY.load_file("toy", listing)
    assert {k: f.evaluate({"key": "u"}).value for k, f in flags.items()} == {"a": True, "b": False}


def test_an_unknown_source_in_the_precedence_list_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(
        env={"FLAGPROXY_STORE_SOURCES": "native,launchdarkly"}, origins=["http://127.0.0.1:9"]
    )
    with pytest.raises(ConfigError, match=r"\[store\] sources: unknown source 'launchdarkly'"):
        FlagProxy(settings)
    with pytest.raises(ConfigError, match=r"\[store\] sources: must include 'native'"):
        load_settings(env={"FLAGPROXY_STORE_SOURCES": "split"})
