"""Experiments on the control plane: conversions in, results out.

    POST /api/track                         conversions from origins and clients ([experiments] track_token)
    GET  /api/experiments                   every experiment: flag, status, variants, users, started
    GET  /api/experiments/{flag}            its results, per goal and variant, with the statistics
    POST /api/experiments/{flag}/reset      forget its recorded data (audited)

Results are read after this process's queued records are written, so a conversion tracked (or a
request proxied) just before is in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.control.auth import bearer_matches
from proxy.control.bodies import read_json
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.problems import HTTPProblem
from proxy.experiments.backend import BackendError
from proxy.experiments.recorder import Recorder
from proxy.experiments.results import results, summary
from proxy.experiments.tracking import TrackError, parse_track
from proxy.store.base import StoreUnavailable

TRACK_WAIT_S = 2.0  # how long POST /api/track waits for its conversions to be written
READ_WAIT_S = 1.0  # how long a results read waits for this process's queued records


def recorder_of(deps: ControlDeps) -> Recorder:
    if deps.recorder is None:
        raise HTTPProblem(404, "experiments_disabled", "experiments are disabled ([experiments] enabled)")
    return deps.recorder


def unavailable(exc: BackendError) -> HTTPProblem:
    return HTTPProblem(503, "experiments_unavailable", f"the experiment store cannot be read now: {exc}")


async def track(request: Request) -> Response:
    deps = deps_of(request)
    settings = deps.settings
    tokens = [t for t in (settings.experiments.track_token, settings.admin.token) if t]
    if not tokens or deps.recorder is None:
        raise HTTPProblem(404, "not_found", f"no control endpoint {request.url.path}")
    authorization = request.headers.get("authorization", "")
    if not any(bearer_matches(authorization, token) for token in tokens):
        raise HTTPProblem(
            401, "unauthorized", "a valid track bearer token is required ([experiments] track_token)"
        )
    body = await read_json(request, settings.webhooks.max_body_bytes)
    try:
        events = parse_track(body, settings.experiments.max_events, time.time())
    except TrackError as exc:
        raise HTTPProblem(exc.status, exc.error, str(exc), field=exc.field) from None
    recorder = deps.recorder
    queued = 0
    for event in events:
        queued += recorder.converted(event.event, event.key, event.at, event.value)
        for sink in deps.analytics.values():
            sink.converted(event.key, event.event, event.value, int(event.at * 1000), event.properties)
    written = await recorder.flushed(TRACK_WAIT_S)
    body_out = {"accepted": len(events), "attributed_to": queued, "recorded": written}
    return JSONResponse(body_out, 200 if written else 202)


async def list_experiments(request: Request) -> Response:
    return JSONResponse({"experiments": await summaries(deps_of(request))})


async def summaries(deps: ControlDeps) -> list[dict[str, Any]]:
    """Every experiment flag and every flag with recorded data: one summary each, by key."""
    recorder = recorder_of(deps)
    flags = deps.store.snapshot.flags
    await recorder.flushed(READ_WAIT_S)
    try:
        stored = await asyncio.to_thread(recorder.backend.flags)
        keys = sorted({k for k, f in flags.items() if f.experiment is not None} | set(stored))
        counts = await asyncio.to_thread(lambda: {k: recorder.backend.counts(k) for k in keys})
    except BackendError as exc:
        raise unavailable(exc) from None
    return [summary(k, flags.get(k), counts[k]) for k in keys]


async def known_experiment(deps: ControlDeps, key: str) -> tuple[Recorder, Any]:
    recorder = recorder_of(deps)
    flag = deps.store.snapshot.flags.get(key)
    await recorder.flushed(READ_WAIT_S)
    try:
        counts = await asyncio.to_thread(recorder.backend.counts, key)
    except BackendError as exc:
        raise unavailable(exc) from None
    if counts is None and (flag is None or flag.experiment is None):
        raise HTTPProblem(
            404, "unknown_experiment", f"no experiment flag {key!r} and no data recorded for it"
        )
    return recorder, counts


async def get_experiment(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    return JSONResponse(await experiment_results(deps, key))


async def experiment_results(deps: ControlDeps, key: str) -> dict[str, Any]:
    """``key``'s results document (404 for a flag that is no experiment and has no data)."""
    _, counts = await known_experiment(deps, key)
    return results(key, deps.store.snapshot.flags.get(key), counts)


async def reset_experiment(request: Request) -> Response:
    deps, key = deps_of(request), request.path_params["key"]
    recorder, counts = await known_experiment(deps, key)
    try:
        removed = await asyncio.to_thread(recorder.backend.reset, key)
    except BackendError as exc:
        raise HTTPProblem(
            503, "experiments_unavailable", f"the experiment store cannot be written now: {exc}"
        ) from None
    recorder.forget()
    users = 0 if counts is None else sum(counts.users.values())
    entry = {"source": "experiments", "actor": "admin", "flag": key, "action": "reset", "users": users}
    with contextlib.suppress(StoreUnavailable):  # the data is gone either way; the store's log says why
        await deps.store.note(entry)
    return JSONResponse({"flag": key, "reset": removed, "users": users})


TRACK_ROUTES = [Route("/track", track, methods=["POST"])]
ROUTES = [
    Route("/experiments", list_experiments, methods=["GET"]),
    Route("/experiments/{key}/reset", reset_experiment, methods=["POST"]),
    Route("/experiments/{key}", get_experiment, methods=["GET"]),
]
