"""The web console (docs/console.md): ``<prefix>/console/``, on whenever ``[admin] token`` is set.

    /                       pages.py   flags: search, source, state, weights, rules, routes, last change
    /login, /logout         pages.py   the admin token once, then a signed session cookie (session.py)
    /flags/{key}            pages.py   one flag: weights or percentage, its JSON definition; its changes
    /flags/{key} (POST)     pages.py   kill, restore, promote, save: the admin API's functions
    /experiments[/{key}]    pages.py   results, a chart of each variant's rate, promote the winner
    /budget, /audit         pages.py   worst-case head size per route; the audit log, filtered
    /evaluate               pages.py   what a request would get
    /events                 live.py    Server-Sent Events on every store change (the client API's hub)
    /static/{name}          here       the page's one script and one style sheet

Server-rendered (Jinja2, autoescaped), so the page needs no build step and no assets from elsewhere;
the script only adds live updates.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, Router

from proxy.config import Settings
from proxy.control.console import pages
from proxy.control.console.live import Events
from proxy.control.problems import EVERY_METHOD, HTTPProblem, disabled

STATIC = {
    name: (Path(__file__).parent / "static" / name).read_bytes() for name in ("console.js", "console.css")
}
TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    body = STATIC.get(name)
    if body is None:
        raise HTTPProblem(404, "not_found", f"no console file {name!r}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=TYPES[name.rsplit(".", 1)[1]], headers=headers)


ROUTES: list[BaseRoute] = [
    Route("/", pages.flags_page, methods=["GET"]),
    Route("/login", pages.login_form, methods=["GET"]),
    Route("/login", pages.login, methods=["POST"]),
    Route("/logout", pages.logout, methods=["POST"]),
    Route("/flags/{key:path}", pages.flag_page, methods=["GET"]),
    Route("/flags/{key:path}", pages.flag_write, methods=["POST"]),
    Route("/experiments", pages.experiments_page, methods=["GET"]),
    Route("/experiments/{key:path}", pages.experiment_page, methods=["GET"]),
    Route("/budget", pages.budget_page, methods=["GET"]),
    Route("/audit", pages.audit_page, methods=["GET"]),
    Route("/evaluate", pages.evaluate_page, methods=["GET"]),
    Route("/events", Events(), methods=["GET"]),
    Route("/static/{name}", static, methods=["GET"]),
]


async def to_console(request: Request) -> Response:
    """``<prefix>/console`` → ``<prefix>/console/`` (a path of this proxy, never built from Host)."""
    return pages.see_other(request, pages.base(request) + "/")


def console_mount(settings: Settings) -> Mount:
    """``/console`` under the control prefix; without an admin token every path is a 404 saying so."""
    if not settings.admin.token:
        off = disabled("the console is disabled: set [admin] token (FLAGPROXY_ADMIN_TOKEN) to enable it")
        return Mount("/console", app=Router([Route("/{rest:path}", off, methods=EVERY_METHOD)]))
    return Mount("/console", app=Router(ROUTES, redirect_slashes=False))
