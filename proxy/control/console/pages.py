"""The console's pages and forms (``<prefix>/console/...``), rendered on the server with Jinja2.

Every write goes through the admin API's own functions (``proxy.control.flags``): the same
validation, the same store change, the same audit entry (actor ``console``), the same fan-out. A
refused write changes nothing and answers 4xx with the page and the message next to its field
(``role="alert"``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from proxy.control import flags as admin
from proxy.control.bodies import read_body
from proxy.control.console import session
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.evaluate import preview
from proxy.control.experiments import experiment_results, summaries
from proxy.control.problems import HTTPProblem
from proxy.dataplane.preflight import largest_outcome, worst_case
from proxy.engine import Flag
from proxy.sources.native.document import SOURCE as NATIVE
from proxy.store.base import StoreUnavailable

ACTOR = "console"
HERE = Path(__file__).parent
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value is text: a flag key or config holding <script> renders inert
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["path"] = lambda value: quote(str(value), safe="")
ENV.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False, sort_keys=True)
ENV.filters["pct"] = lambda value: "—" if value is None else f"{100 * value:.1f} %"
ENV.filters["num"] = lambda value: "—" if value is None else f"{value:.3g}"
TEMPLATES = Jinja2Templates(env=ENV)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request], Awaitable[Response]]
MAX_FORM_BYTES = 262_144


def base(request: Request) -> str:
    return deps_of(request).settings.server.control_prefix + "/console"


def page(
    request: Request,
    name: str,
    context: dict[str, Any],
    status: int = 200,
    signed: session.Session | None = None,
) -> Response:
    deps = deps_of(request)
    values = {
        "base": base(request),
        "csrf": signed.csrf if signed is not None else "",
        "signed_in": signed is not None,
        "version": deps.store.snapshot.version,
        "view": name.removesuffix(".html"),
        **context,
    }
    response = TEMPLATES.TemplateResponse(request, name, values, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


async def form_of(request: Request) -> dict[str, str]:
    """A urlencoded form (bounded); the last value of a repeated field wins."""
    body = await read_body(request, MAX_FORM_BYTES)
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=1000))
    except (UnicodeDecodeError, ValueError):
        raise HTTPProblem(
            400, "bad_form", "the form is not valid application/x-www-form-urlencoded"
        ) from None


def current(request: Request) -> session.Session | None:
    return session.verify(deps_of(request).settings, request.cookies.get(session.COOKIE, ""))


def login_page(request: Request, status: int, message: str = "") -> Response:
    target = request.url.path if request.method == "GET" else base(request) + "/"
    return page(request, "login.html", {"message": message, "next": target}, status)


def signed_in(handler: Callable[[Request, session.Session], Awaitable[Response]]) -> Handler:
    """A page for signed-in users; a write (not GET) must also be same-origin and carry the CSRF token."""

    async def endpoint(request: Request) -> Response:
        signed = current(request)
        if signed is None:
            return login_page(
                request, 401, "Sign in with the admin token." if request.method != "GET" else ""
            )
        if request.method not in ("GET", "HEAD"):
            refused = session.cross_site(request)
            if refused is not None:
                raise HTTPProblem(403, "cross_site", f"{refused}: console writes come from the console")
            given = request.headers.get("x-csrf-token")
            if given is None:
                form = await form_of(request)
                request.state.form = form
                given = form.get("csrf")
            if not session.csrf_matches(signed, given):
                raise HTTPProblem(
                    403, "csrf", "the CSRF token is missing or wrong: reload the console and try again"
                )
        return await handler(request, signed)

    return endpoint


# --- sign-in ------------------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    if current(request) is not None:
        return see_other(request, base(request) + "/")
    return login_page(request, 200)


async def login(request: Request) -> Response:
    refused = session.cross_site(request)
    if refused is not None:
        raise HTTPProblem(403, "cross_site", f"{refused}: sign in on the console's own page")
    deps = deps_of(request)
    form = await form_of(request)
    if not session.token_matches(deps.settings, form.get("token", "")):
        return login_page(request, 401, "That is not the admin token.")
    value, _ = session.issue(deps.settings)
    target = form.get("next", "")
    if not target.startswith(base(request) + "/") or "//" in target or "\\" in target:
        target = base(request) + "/"
    response = see_other(request, target)
    prefix = deps.settings.server.control_prefix
    response.headers["set-cookie"] = session.cookie_header(
        request, prefix, value, deps.settings.console.session_ttl_s
    )
    return response


async def _logout(request: Request, signed: session.Session) -> Response:
    response = see_other(request, base(request) + "/login")
    prefix = deps_of(request).settings.server.control_prefix
    response.headers["set-cookie"] = session.cookie_header(request, prefix, "", 0)
    return response


logout = signed_in(_logout)


def see_other(request: Request, path: str) -> Response:
    """303 to a path of this console (never built from the Host header)."""
    return Response(status_code=303, headers={"Location": path, **SECURITY_HEADERS})


# --- flags --------------------------------------------------------------------------------------------


async def last_changes(deps: ControlDeps) -> dict[str, dict[str, Any]]:
    """Each flag's newest audit entry (what the store keeps: ``[store] audit_max`` entries)."""
    try:
        entries = await deps.store.audit(deps.settings.store.audit_max)
    except StoreUnavailable:
        return {}
    newest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        key = entry.get("flag")
        if isinstance(key, str) and key not in newest:
            newest[key] = entry
    return newest


def shares(flag: Flag, definition: Any) -> list[tuple[str, str]]:
    """(outcome, its share) as the definition declares them (native), else the outcomes served."""
    if isinstance(definition, dict) and flag.source == NATIVE:
        variants = definition.get("variants")
        if isinstance(variants, dict):
            total = sum(v.get("weight", 0) for v in variants.values() if isinstance(v, dict)) or 1
            return [
                (name, f"{100 * spec.get('weight', 0) / total:.4g} %")
                for name, spec in variants.items()
                if isinstance(spec, dict)
            ]
        if definition.get("enabled", True) is False:
            return [("false", "100 %")]
        on = definition.get("percentage", 100)
        return [("true", f"{on:.4g} %"), ("false", f"{100 - on:.4g} %")]
    return [(json.dumps(s.value), "") for s in flag.served]


def state_of(flag: Flag, found: dict[str, Any]) -> str:
    override = found.get("override")
    if isinstance(override, dict) and override.get("kill"):
        return "killed"
    if isinstance(override, dict) and "promote" in override:
        return f"promoted: {json.dumps(override['promote'])}"
    if "invalid" in found:
        return "invalid (serving its last good definition)"
    definition = found.get("definition")
    if isinstance(definition, dict) and definition.get("enabled", True) is False:
        return "disabled"
    return "enabled"


def flag_row(deps: ControlDeps, key: str, changes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    flag = deps.store.snapshot.flags.get(key)
    found = admin.describe(deps, key)
    if flag is None or found is None:
        return None
    definition = found.get("definition")
    rules = definition.get("rules") if isinstance(definition, dict) else None
    return {
        "key": key,
        "source": found["source"],
        "native": found["source"] == NATIVE,
        "state": state_of(flag, found),
        "overridden": "override" in found,
        "shares": shares(flag, definition),
        "variants": [json.dumps(s.value) if isinstance(s.value, bool) else s.value for s in flag.served],
        "rules": len(rules) if isinstance(rules, list) else None,
        "routes": list(flag.routes) if flag.routes is not None else None,
        "priority": flag.priority,
        "experiment": flag.experiment is not None,
        "change": changes.get(key),
        "invalid": found.get("invalid"),
        "definition": definition,
    }


async def _flags(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    query = request.query_params.get("q", "").strip()
    source = request.query_params.get("source", "")
    changes = await last_changes(deps)
    rows = []
    for key in sorted(deps.store.snapshot.flags):
        if query and query.lower() not in key.lower():
            continue
        row = flag_row(deps, key, changes)
        if row is not None and (not source or row["source"] == source):
            rows.append(row)
    context = {"rows": rows, "q": query, "source": source, "sources": list(reversed(deps.precedence))}
    return page(request, "flags.html", context, signed=signed)


flags_page = signed_in(_flags)


def edit_context(deps: ControlDeps, key: str) -> dict[str, Any]:
    row = flag_row(deps, key, {})
    if row is None:
        raise HTTPProblem(404, "unknown_flag", f"no flag {key!r}")
    definition = row["definition"] if isinstance(row["definition"], dict) else {}
    shown = {k: v for k, v in definition.items() if k != "updatedAt"}
    variants = definition.get("variants")
    return {
        "row": row,
        "weights": (
            [(n, s.get("weight", 0)) for n, s in variants.items() if isinstance(s, dict)]
            if isinstance(variants, dict)
            else None
        ),
        "percentage": definition.get("percentage", 100) if not isinstance(variants, dict) else None,
        "definition_text": json.dumps(shown, indent=2, ensure_ascii=False),
        "errors": {},
        "values": {},
    }


async def _flag_page(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    context = edit_context(deps, request.path_params["key"])
    context["changes"] = [e for e in await audit_entries(deps) if e.get("flag") == request.path_params["key"]]
    return page(request, "flag.html", context, signed=signed)


flag_page = signed_in(_flag_page)


def weights_definition(
    definition: dict[str, Any], form: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The stored definition with the form's weights (or percentage); errors by field name."""
    errors: dict[str, str] = {}
    out = {k: v for k, v in definition.items() if k != "updatedAt"}  # a console edit is made now
    variants = definition.get("variants")
    if isinstance(variants, dict):
        new = {}
        for name, spec in variants.items():
            raw = form.get(f"weight.{name}", "").strip()
            number = _number(raw)
            if number is None:
                errors[f"weight.{name}"] = f"the weight of {name!r} must be a number, got {raw!r}"
            new[name] = {**spec, "weight": number if number is not None else raw}
        out["variants"] = new
    else:
        raw = form.get("percentage", "").strip()
        number = _number(raw)
        if number is None:
            errors["percentage"] = f"the percentage must be a number from 0 to 100, got {raw!r}"
        out["percentage"] = number
    return out, errors


def _number(text: str) -> int | float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def field_of(path: str) -> str:
    """The form field an engine error path names (``flags.x.variants.a.weight`` → ``weight.a``)."""
    parts = path.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and "variants" in parts:
        return f"weight.{parts[-2]}"
    if parts[-1] == "percentage":
        return "percentage"
    return "definition"


async def _flag_write(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    key = request.path_params["key"]
    form: dict[str, str] = getattr(request.state, "form", None) or await form_of(request)
    action = form.get("action", "")
    back = form.get("back", "")
    if action == "kill":
        await admin.kill(deps, key, ACTOR)
    elif action == "restore":
        await admin.restore(deps, key, ACTOR)
    elif action == "promote":
        await admin.promote(deps, key, form.get("variant"), ACTOR)
    elif action == "save":
        response = await save(request, signed, deps, key, form)
        if response is not None:
            return response
    else:
        raise HTTPProblem(400, "bad_action", "action must be kill, restore, promote or save")
    if back == "experiment":
        return see_other(request, f"{base(request)}/experiments/{quote(key, safe='')}")
    if back == "flag":
        return see_other(request, f"{base(request)}/flags/{quote(key, safe='')}")
    return see_other(request, f"{base(request)}/#flag-{quote(key, safe='')}")


async def save(
    request: Request, signed: session.Session, deps: ControlDeps, key: str, form: dict[str, str]
) -> Response | None:
    """A weights or definition edit; the edit page again with the message (422) when refused."""
    context = edit_context(deps, key)
    if not context["row"]["native"]:
        raise HTTPProblem(
            409, "not_native", f"{key!r} comes from {context['row']['source']}: change it there"
        )
    what = form.get("what", "")
    errors: dict[str, str] = {}
    if what == "weights":
        definition, errors = weights_definition(context["row"]["definition"], form)
        context["values"] = {k: v for k, v in form.items() if k.startswith(("weight.", "percentage"))}
    elif what == "definition":
        text = form.get("definition", "")
        context["definition_text"] = text
        try:
            definition = json.loads(text)
        except ValueError as exc:
            errors["definition"] = f"not valid JSON: {exc}"
    else:
        raise HTTPProblem(400, "bad_form", "what must be weights or definition")
    if not errors:
        try:
            await admin.put(deps, key, definition, ACTOR)
            return None
        except HTTPProblem as exc:
            if exc.status != 422:
                raise
            errors[field_of(str(exc.extra.get("field", "")))] = exc.detail
    context["errors"] = errors
    context["changes"] = []
    return page(request, "flag.html", context, status=422, signed=signed)


flag_write = signed_in(_flag_write)


# --- experiments --------------------------------------------------------------------------------------


async def _experiments(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    try:
        listed = await summaries(deps)
        problem = ""
    except HTTPProblem as exc:
        listed, problem = [], exc.detail
    return page(request, "experiments.html", {"experiments": listed, "problem": problem}, signed=signed)


experiments_page = signed_in(_experiments)


def rate_interval(rate: float | None, users: int) -> tuple[float, float] | None:
    """A 95 % normal interval of a conversion rate, for the chart (the table has the statistics)."""
    if rate is None or users == 0:
        return None
    half = 1.959964 * math.sqrt(rate * (1 - rate) / users)
    return max(0.0, rate - half), min(1.0, rate + half)


def winner(rows: list[dict[str, Any]]) -> Any:
    """The variant to promote: the treatment most likely to beat the control, if more likely than
    not; else the control."""
    if not rows:
        return None
    best = max(rows[1:], key=lambda r: r.get("chance_to_win") or 0.0, default=None)
    if best is not None and (best.get("chance_to_win") or 0.0) > 0.5:
        return best["variant"]
    return rows[0]["variant"]


def chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars of each variant's rate with its interval, laid out for the SVG in the template."""
    bars = []
    top = max([i[1] for r in rows if (i := rate_interval(r.get("rate"), r["users"]))] + [0.01])
    scale = 1.0 / top
    for index, row in enumerate(rows):
        interval = rate_interval(row.get("rate"), row["users"])
        bars.append(
            {
                "label": json.dumps(row["variant"]) if isinstance(row["variant"], bool) else row["variant"],
                "y": 10 + index * 36,
                "width": 320 * (row.get("rate") or 0.0) * scale,
                "low": None if interval is None else 320 * interval[0] * scale,
                "high": None if interval is None else 320 * interval[1] * scale,
                "rate": row.get("rate"),
            }
        )
    return {"bars": bars, "height": 20 + 36 * len(rows), "top": top}


async def _experiment(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    key = request.path_params["key"]
    result = await experiment_results(deps, key)
    goals = []
    for goal, body in result["goals"].items():
        rows = body["variants"]
        goals.append({"name": goal, "rows": rows, "chart": chart(rows), "winner": winner(rows)})
    flag = deps.store.snapshot.flags.get(key)
    context = {"result": result, "goals": goals, "key": key, "live": flag is not None}
    return page(request, "experiment.html", context, signed=signed)


experiment_page = signed_in(_experiment)


# --- header budget, audit, evaluate -------------------------------------------------------------------


async def _budget(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    flags = deps.store.snapshot.flags
    rows = worst_case(deps.settings, flags, deps.flag_headers)
    alert = deps.settings.header.alert_ratio
    top = max([r.ratio for r in rows] + [1.0])
    bars = [
        {
            "row": r,
            "width": 400 * min(r.ratio, top) / top,
            "over": r.worst_bytes > r.budget,
            "alerting": r.ratio >= alert,
        }
        for r in rows
    ]
    largest = sorted(
        ((f.key, sum(n for n in f.entry(largest_outcome(f))[2:])) for f in flags.values()),
        key=lambda kv: (-kv[1], kv[0]),
    )[:10]
    context = {
        "bars": bars,
        "alert_x": 400 * alert / top,
        "limit_x": 400 / top,
        "alert": alert,
        "largest": largest,
    }
    return page(request, "budget.html", context, signed=signed)


budget_page = signed_in(_budget)


async def audit_entries(deps: ControlDeps) -> list[dict[str, Any]]:
    with contextlib.suppress(StoreUnavailable):
        return await deps.store.audit(deps.settings.store.audit_max)
    return []


AUDIT_FILTERS = ("flag", "actor", "action", "source")


async def _audit(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    filters = {name: request.query_params.get(name, "").strip() for name in AUDIT_FILTERS}
    entries = [
        e
        for e in await audit_entries(deps)
        if all(not value or str(e.get(name, "")) == value for name, value in filters.items())
    ]
    return page(request, "audit.html", {"entries": entries, "filters": filters}, signed=signed)


audit_page = signed_in(_audit)


def attributes_of(text: str) -> tuple[dict[str, Any], str]:
    """``name=value`` lines → attributes, or the message for the first line that is not one."""
    out: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            return {}, f"line {number}: expected name=value, got {line.strip()!r}"
        out[name.strip()] = value.strip()
    return out, ""


async def _evaluate(request: Request, signed: session.Session) -> Response:
    deps = deps_of(request)
    params = request.query_params
    form = {name: params.get(name, "") for name in ("key", "path", "attributes")}
    context: dict[str, Any] = {"form": form, "result": None, "errors": {}}
    status = 200
    if "key" in params:
        attributes, problem = attributes_of(form["attributes"])
        if problem:
            context["errors"]["attributes"] = problem
            status = 400
        else:
            head = str(deps.settings.header.typical_request_bytes)
            path = form["path"] or None
            context["result"] = preview(deps, form["key"] or None, attributes, path, None, head)
    return page(request, "evaluate.html", context, status=status, signed=signed)


evaluate_page = signed_in(_evaluate)
