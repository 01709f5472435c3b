"""uvicorn integration: how the proxy is served (protocol, workers)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import ConfigError, Settings, load_settings

log = logging.getLogger("flagproxy")
INPUTS_ENV = "FLAGPROXY__SERVE_INPUTS"  # how worker processes get the parent's settings inputs


class ProxyHttpProtocol(HttpToolsProtocol):
    """httptools, with the header section frozen once it is complete.

    uvicorn appends chunked trailer fields to the same list it handed the app as
    ``scope["headers"]``; RFC 9110 §6.5.1 forbids merging trailers into the header section (a
    trailer could otherwise add a Host or a flag key after the fact). The app gets a copy.
    """

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.scope.get("type") == "http":
            self.scope["headers"] = list(self.headers)


def settings_from_inputs(inputs: dict[str, Any]) -> Settings:
    settings = load_settings(
        config_file=inputs.get("config"), overrides=inputs.get("overrides"), origins=inputs.get("origins")
    )
    if not settings.origins:
        raise ConfigError("origins: at least one origin is required (--origin [PREFIX=]URL or [[origins]])")
    return settings


def app_from_environment() -> Any:
    """The app factory each worker process calls (``--workers N``)."""
    from proxy.app import FlagProxy

    return FlagProxy(settings_from_inputs(json.loads(os.environ[INPUTS_ENV])))


def run(settings: Settings, inputs: dict[str, Any], workers: int = 1, log_level: str = "info") -> None:
    from proxy.app import FlagProxy

    app = FlagProxy(settings)  # also validates flags and settings before anything listens
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": "uvloop",
        "http": ProxyHttpProtocol,
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "date_header": False,
        # X-Forwarded-* trust is the proxy's own decision ([proxy] trusted_proxies), never uvicorn's.
        "proxy_headers": False,
        "log_level": log_level,
        "timeout_graceful_shutdown": settings.server.shutdown_grace_s,
    }
    if workers == 1:
        uvicorn.run(app, **options)
        return
    if not settings.store.redis_url:
        log.warning(
            "%d workers on the embedded memory store: a webhook or admin change reaches only the worker "
            "that received it; use --redis-url so every worker shares the flags",
            workers,
        )
    os.environ[INPUTS_ENV] = json.dumps(inputs)
    uvicorn.run("proxy.server:app_from_environment", factory=True, workers=workers, **options)
