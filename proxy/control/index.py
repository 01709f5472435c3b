"""``GET /__flags/``: the control endpoints, which of them are on, and what turns the others on.

A new operator's first stop and a script's way to see what a proxy offers. It names settings, never
their values: no token, secret or key appears here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.config import Settings


@dataclass(frozen=True)
class Endpoint:
    path: str  # relative to the control prefix
    what: str
    enabled: bool
    enable_with: str = ""  # the setting that turns it on, for one that is off
    auth: str = ""  # what a caller must present, "" = nothing
    methods: tuple[str, ...] = ("GET",)


# the methods of each core endpoint (and of the paths under it: /api/flags/{key}/kill is a POST)
METHODS = {
    "/": ("GET", "HEAD"),
    "/healthz": ("GET", "HEAD"),
    "/readyz": ("GET", "HEAD"),
    "/api/flags": ("GET", "PUT", "DELETE", "POST"),
    "/api/experiments": ("GET", "POST"),
    "/api/track": ("POST",),
    "/ofrep/v1/evaluate/flags": ("POST",),
    "/chat/slack": ("POST",),
    "/chat/telegram": ("POST",),
}


def core_endpoints(settings: Settings, *, clients: bool, chat: bool) -> list[Endpoint]:
    """Every endpoint of the control plane's own (webhooks come from their sources)."""
    admin = bool(settings.admin.token)
    admin_with = "[admin] token (FLAGPROXY_ADMIN_TOKEN)"
    bearer = "Authorization: Bearer <admin token>"
    keys_with = "[[client_keys]] (docs/clients.md)"
    client_auth = "a client key: Authorization: Bearer <key> or X-API-Key"
    slack = chat and bool(settings.chat.slack.signing_secret)
    telegram = chat and bool(settings.chat.telegram.secret_token)
    listed = [
        Endpoint("/", "this list", True),
        Endpoint("/healthz", "liveness: the process answers", True),
        Endpoint("/readyz", "readiness: a first flag snapshot is loaded", True),
        Endpoint(
            "/metrics",
            "Prometheus metrics",
            settings.metrics.enabled,
            "" if settings.metrics.enabled else "[metrics] enabled = true",
            "Authorization: Bearer <metrics token>" if settings.metrics.token else "",
        ),
        Endpoint(
            "/console/",
            "the web console: flags, experiments, header budget, audit log, evaluate",
            admin,
            admin_with,
            "sign in with the admin token (a session cookie)",
        ),
        Endpoint("/api/flags", "read and change flags; kill, promote, restore", admin, admin_with, bearer),
        Endpoint("/api/evaluate", "a caller's flags and why", admin, admin_with, bearer),
        Endpoint("/api/audit", "who changed what", admin, admin_with, bearer),
        Endpoint("/api/stale", "potentially stale flags", admin, admin_with, bearer),
        Endpoint("/api/experiments", "experiment results", admin, admin_with, bearer),
        Endpoint(
            "/api/track",
            "conversions sent by origins and clients",
            settings.experiments.enabled and (admin or bool(settings.experiments.track_token)),
            "[experiments] track_token or [admin] token",
            "Authorization: Bearer <track or admin token>",
        ),
        Endpoint(
            "/ofrep/v1/evaluate/flags",
            "OpenFeature remote evaluation (OFREP)",
            clients,
            keys_with,
            client_auth,
        ),
        Endpoint(
            "/client/v1/flags", "the compact call for games and mobile", clients, keys_with, client_auth
        ),
        Endpoint("/client/v1/stream", "live updates (Server-Sent Events)", clients, keys_with, client_auth),
        Endpoint(
            "/chat/slack",
            "the /flag Slack command",
            slack,
            "[chat.slack] signing_secret",
            "Slack's signature",
        ),
        Endpoint(
            "/chat/telegram",
            "the /flag Telegram bot",
            telegram,
            "[chat.telegram] secret_token",
            "X-Telegram-Bot-Api-Secret-Token",
        ),
    ]
    return [dataclasses.replace(e, methods=METHODS.get(e.path, e.methods)) for e in listed]


def index_body(prefix: str, endpoints: Sequence[Endpoint]) -> dict[str, object]:
    return {
        "service": "flagproxy",
        "control_prefix": prefix,
        "endpoints": [
            {
                "path": prefix + e.path,
                "what": e.what,
                "methods": list(e.methods),
                "enabled": e.enabled,
                **({"auth": e.auth} if e.auth else {}),
                **({"enable_with": e.enable_with} if not e.enabled and e.enable_with else {}),
            }
            for e in endpoints
        ],
    }


def control_index(prefix: str, endpoints: Sequence[Endpoint]) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint: the list is built once, from the settings the control plane was built with."""
    body = index_body(prefix, endpoints)

    async def index(request: Request) -> Response:
        return JSONResponse(body)

    return index
