"""The control plane: one Starlette app under the reserved prefix (default ``/__flags``).

    /                      index.py      the control endpoints, which are on, what turns the others on
    /healthz, /readyz      probes.py     liveness and readiness
    /metrics               metrics.py    Prometheus exposition
    /webhooks/<source>     each source's own package (Source.webhook_routes)
    /api/flags...          flags.py      read and change flags, kill / promote / restore
    /api/evaluate          evaluate.py   a caller's flags and why, through the data plane's fitter
    /api/audit             audit.py      who changed what
    /api/stale             lifecycle.py  potentially stale flags
    /api/experiments...    experiments.py  experiment results and resets; /api/track takes conversions
    /chat/slack            chat/slack.py     the /flag slash command (only with [chat.slack] signing_secret)
    /chat/telegram         chat/telegram.py  the /flag bot webhook (only with [chat.telegram] secret_token)
    /ofrep/v1/evaluate/... clients/ofrep.py    OFREP evaluation for OpenFeature clients (client keys)
    /client/v1/flags       clients/compact.py  the compact call for games and mobile (client keys)
    /client/v1/stream      clients/stream.py   live updates, Server-Sent Events (client keys or a token)
    /console/...           console/            the web console (a signed session; only with [admin] token)

``/ofrep`` and ``/client`` exist only with ``[[client_keys]]`` (``proxy/control/clients/``).
``/api`` sits behind bearer-token middleware (``[admin] token``; without one it does not exist).
Errors are raised as ``HTTPProblem`` and answered by one registered handler (``problems.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, Router

from proxy.control import audit, evaluate, experiments, flags, lifecycle, metrics, probes
from proxy.control.auth import BearerAuth
from proxy.control.chat import slack, telegram
from proxy.control.clients import client_mounts
from proxy.control.console import console_mount, to_console
from proxy.control.deps import ControlDeps
from proxy.control.index import Endpoint, control_index, core_endpoints
from proxy.control.problems import EVERY_METHOD as ALL
from proxy.control.problems import HANDLERS, disabled


def build_control_app(
    deps: ControlDeps, webhook_routes: Sequence[BaseRoute] = (), webhook_endpoints: Sequence[Endpoint] = ()
) -> Starlette:
    api_routes = [*flags.ROUTES, *evaluate.ROUTES, *audit.ROUTES, *lifecycle.ROUTES, *experiments.ROUTES]
    api = Mount(
        "/api",  # /api/track checks its own token ([experiments] track_token, or the admin token)
        app=Router([*api_routes, *experiments.TRACK_ROUTES], redirect_slashes=False),
        middleware=[Middleware(BearerAuth, token=deps.settings.admin.token, routes=api_routes)],
    )
    webhooks = Mount("/webhooks", app=Router(list(webhook_routes), redirect_slashes=False))
    # each chat exists only with its secret: without one its path is a 404 naming the setting
    chat_routes: list[BaseRoute] = [
        Route(
            "/slack", disabled("Slack commands are disabled: set [chat.slack] signing_secret"), methods=ALL
        ),
        Route(
            "/telegram",
            disabled("Telegram commands are disabled: set [chat.telegram] secret_token"),
            methods=ALL,
        ),
    ]
    if deps.chat is not None:
        if deps.settings.chat.slack.signing_secret:
            chat_routes[0] = slack.ROUTES[0]
        if deps.settings.chat.telegram.secret_token:
            chat_routes[1] = telegram.ROUTES[0]
    chat = Mount("/chat", app=Router(chat_routes, redirect_slashes=False))
    # the client API first: it takes the most requests (every route before it is tried in turn)
    prefix = deps.settings.server.control_prefix
    clients_on = deps.clients is not None and deps.clients.enabled
    endpoints = core_endpoints(deps.settings, clients=clients_on, chat=deps.chat is not None)
    index = control_index(prefix, [*endpoints, *webhook_endpoints])
    routes = [
        *client_mounts(deps.clients),
        *probes.ROUTES,
        *metrics.ROUTES,
        webhooks,
        api,
        chat,
        Route("/console", to_console, methods=["GET"]),
        console_mount(deps.settings),
        Route("/", index, methods=["GET", "HEAD"]),
    ]
    app = Starlette(
        routes=[
            Route(prefix, index, methods=["GET", "HEAD"]),
            Mount(prefix, app=Router(routes, redirect_slashes=False)),
        ],
        exception_handlers=dict(HANDLERS),
    )
    # a redirect would be built from the client's Host header: an open redirect under the prefix
    app.router.redirect_slashes = False
    app.state.deps = deps
    return app
