"""``/__flags/api/flags``: read and change flags; kill, promote and restore (the overrides).

Writes go to the native source (the admin API writes flagproxy's own format); a flag another source
defines is read-only here, apart from its overrides.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.bodies import read_json
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.problems import HTTPProblem
from proxy.control.webhooks import apply, result_response
from proxy.engine import Flag, FlagError
from proxy.sources.native.document import SOURCE as NATIVE
from proxy.sources.native.document import validated_delete, validated_upsert
from proxy.store.change import Change, stored_text
from proxy.store.state import OVERRIDES, ApplyResult


def describe(deps: ControlDeps, key: str) -> dict[str, Any] | None:
    """The stored definition that serves ``key`` (the winning source), with its override if any;
    ``invalid`` says why a stored definition is not used (its flag serves its last good one)."""
    snapshot = deps.store.snapshot
    raw = snapshot.raw
    for source in reversed(deps.precedence):
        text = raw.items(source).get(key)
        if text is not None:
            out: dict[str, Any] = {"key": key, "source": source, "definition": _parsed(text)}
            problem = snapshot.invalid.get(source, {}).get(key)
            if problem is not None:
                out["invalid"] = problem
            override = raw.items(OVERRIDES).get(key)
            if override is not None:
                out["override"] = _parsed(override)
            stale = deps.lifecycle.marker(key) if deps.lifecycle is not None else None
            if stale is not None:
                out["stale"] = stale  # potentially stale, and why (as last checked: docs/lifecycle.md)
            return out
    return None


def _parsed(text: str) -> Any:
    """Stored JSON text; ``None`` for text that is not JSON (written into the store by something else)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def override_change(key: str, action: str, actor: str, variant: bool | str | None = None) -> Change:
    """A kill, a promotion (of ``variant``) or a restore, as the store takes it."""
    if action == "restore":
        return Change(source=OVERRIDES, delete=[key], actor=actor, action=action)
    override = {"kill": True} if action == "kill" else {"promote": variant}
    return Change(source=OVERRIDES, upsert={key: stored_text(override)}, actor=actor, action=action)


def promotable(flag: Flag, variant: Any) -> bool | str | None:
    """The outcome ``variant`` names (``"true"``/``"false"`` for a boolean flag), or None."""
    if isinstance(variant, str) and isinstance(flag.default.value, bool) and variant in ("true", "false"):
        variant = variant == "true"
    if variant is None or flag.outcome(variant) is None:
        return None
    value: bool | str = variant
    return value


def choices(flag: Flag) -> str:
    return ", ".join(json.dumps(s.value) for s in flag.served)


def unknown(key: str) -> HTTPProblem:
    return HTTPProblem(404, "unknown_flag", f"no flag {key!r}")


async def list_flags(request: Request) -> Response:
    deps = deps_of(request)
    snapshot = deps.store.snapshot
    flags = {key: describe(deps, key) for key in sorted(snapshot.flags)}
    return JSONResponse({"version": snapshot.version, "flags": flags})


async def get_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    found = describe(deps, key)
    if found is None:
        raise unknown(key)
    return JSONResponse({**found, "version": deps.store.snapshot.version})


# --- the changes, shared by the handlers below and the console (proxy/control/console/) ---------------
# Each validates before it writes (a refusal is an HTTPProblem and changes nothing) and goes through the
# store like every other write: the same audit entry (with ``actor``), the same fan-out.


async def put(deps: ControlDeps, key: str, definition: Any, actor: str) -> ApplyResult:
    """``key`` defined whole as ``definition`` (native format); 422 naming the field the engine refuses."""
    try:
        change = validated_upsert(key, definition, actor=actor)
    except FlagError as exc:
        raise HTTPProblem(422, "invalid_flags", str(exc), field=exc.path) from None
    return checked(await apply(deps.store, change))


async def delete(deps: ControlDeps, key: str, actor: str) -> ApplyResult:
    found = describe(deps, key)
    if found is None:
        raise unknown(key)
    if found["source"] != NATIVE:
        raise HTTPProblem(409, "not_native", f"{key!r} comes from {found['source']}: change it there")
    store = deps.store
    # A tombstone versioned above what was stored: a replayed older upsert cannot bring the flag back.
    result = await apply(store, validated_delete(key, actor=actor))
    if key in store.snapshot.raw.items(OVERRIDES):
        # A kill or promotion belongs to the flag: it must not come back with a new flag of that name.
        result = await apply(store, override_change(key, "restore", actor))
    return checked(result)


async def kill(deps: ControlDeps, key: str, actor: str) -> ApplyResult:
    if key not in deps.store.snapshot.flags:
        raise unknown(key)
    return checked(await apply(deps.store, override_change(key, "kill", actor)))


async def promote(deps: ControlDeps, key: str, variant: Any, actor: str) -> ApplyResult:
    """Everyone gets ``variant`` (a variant name; ``true``/``false`` or ``"true"``/``"false"`` for a
    boolean flag); 422 listing the choices for one the flag does not serve."""
    flag = deps.store.snapshot.flags.get(key)
    if flag is None:
        raise unknown(key)
    chosen = promotable(flag, variant)
    if chosen is None:
        raise HTTPProblem(422, "unknown_variant", f'body must be {{"variant": one of {choices(flag)}}}')
    return checked(await apply(deps.store, override_change(key, "promote", actor, chosen)))


async def restore(deps: ControlDeps, key: str, actor: str) -> ApplyResult:
    return checked(await apply(deps.store, override_change(key, "restore", actor)))


def checked(result: ApplyResult) -> ApplyResult:
    """``result``, or the 409 of a stale or versionless write (``result_response``'s refusals)."""
    result_response(result, 200)
    return result


# --- the handlers -------------------------------------------------------------------------------------


async def put_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    definition = await read_json(request, deps.settings.webhooks.max_body_bytes)
    return result_response(await put(deps, key, definition, "admin"), 200)


async def delete_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    return result_response(await delete(deps, key, "admin"), 200)


async def kill_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    return result_response(await kill(deps, key, "admin"), 200)


async def promote_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    if key not in deps.store.snapshot.flags:
        raise unknown(key)
    body = await read_json(request, deps.settings.webhooks.max_body_bytes)
    variant = body.get("variant") if isinstance(body, dict) else None
    return result_response(await promote(deps, key, variant, "admin"), 200)


async def restore_flag(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    return result_response(await restore(deps, key, "admin"), 200)


ROUTES = [
    Route("/flags", list_flags, methods=["GET"]),
    Route("/flags/{key}", get_flag, methods=["GET"]),
    Route("/flags/{key}", put_flag, methods=["PUT"]),
    Route("/flags/{key}", delete_flag, methods=["DELETE"]),
    Route("/flags/{key}/kill", kill_flag, methods=["POST"]),
    Route("/flags/{key}/promote", promote_flag, methods=["POST"]),
    Route("/flags/{key}/restore", restore_flag, methods=["POST"]),
]
