"""Experiments under review: hostile track bodies, conversions an origin reports while it answers,
through real proxy processes (SQLite, the embedded default)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support import (
    OriginConnection,
    ProxyProcess,
    RawOrigin,
    RecordedRequest,
    http_client,
    http_response,
    wait_for,
)

TOKEN = "admin-token-review"
TRACK = "track-token-review"
FLAGS = {
    "flags": {
        "price": {
            "variants": {"control": {"weight": 50}, "cheap": {"weight": 50}},
            "defaultVariant": "control",
            "experiment": {"goals": ["buy", "signup"], "window_hours": 1},
        },
    }
}
CONFIG = f"""
[admin]
token = "{TOKEN}"

[experiments]
track_token = "{TRACK}"
flush_interval_s = 0.05
"""


class Review:
    def __init__(self, proxy: ProxyProcess, origin: RawOrigin) -> None:
        self.proxy, self.origin = proxy, origin
        self.http = http_client()

    def get(self, path: str, user: str, method: str = "GET") -> httpx.Response:
        return self.http.request(method, f"{self.proxy.base_url}{path}", headers={"X-User-Id": user})

    def track(self, raw: bytes) -> httpx.Response:
        return self.http.post(
            f"{self.proxy.base_url}/__flags/api/track",
            headers={"Authorization": f"Bearer {TRACK}"},
            content=raw,
        )

    def results(self, flag: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.proxy.base_url}/__flags/api/experiments/{flag}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def review(origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]) -> Review:
    origin = origin_factory()
    where: dict[str, str] = {}

    async def signup(request: RecordedRequest, conn: OriginConnection) -> None:
        # an origin reporting the conversion itself, as docs/experiments.md shows: it handles the
        # request (which carried the experiment flag), records the signup, tells flagproxy, answers
        user = dict((n.decode().lower(), v.decode()) for n, v in request.headers)["x-user-id"]
        body = json.dumps({"key": user, "event": "signup"}).encode()

        def post() -> int:
            with httpx.Client(timeout=5.0) as client:
                return client.post(
                    f"{where['url']}/__flags/api/track",
                    headers={"Authorization": f"Bearer {TRACK}"},
                    content=body,
                ).status_code

        status = await asyncio.to_thread(post)
        await conn.send(http_response(201, [("Content-Type", "text/plain")], b"tracked %d" % status))

    origin.route("/signup", signup)
    config = CONFIG + f'\n[[origins]]\nprefix = "/"\nurl = "{origin.url}"\n'
    proxy = proxy_factory(config=config, flags=FLAGS)
    where["url"] = proxy.base_url
    return Review(proxy, origin)


@pytest.mark.parametrize(
    "number",
    [b"1" + b"0" * 400, b"-" + b"9" * 309, b"1" * 4000],
    ids=["1e400-as-integer", "minus-1e309-as-integer", "4000-digits"],
)
def test_an_integer_value_too_large_for_a_float_is_refused_with_422(review: Review, number: bytes) -> None:
    # JSON integers are unbounded; math.isfinite(int) raises OverflowError past ~1.8e308 (a 500)
    before = review.results("price")
    response = review.track(b'{"key": "big-value", "event": "buy", "value": ' + number + b"}")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "value"
    assert review.results("price") == before


def test_a_big_but_finite_integer_value_is_accepted(review: Review) -> None:
    assert review.get("/shop/x", "big-ok").status_code == 200
    response = review.track(b'{"key": "big-ok", "event": "buy", "value": 1' + b"0" * 300 + b"}")
    assert response.status_code == 200, response.text
    rows = review.results("price")["goals"]["buy"]["variants"]
    assert sum(row["conversions"] for row in rows) >= 1


def test_a_conversion_the_origin_tracks_while_answering_the_exposing_request_is_attributed(
    review: Review,
) -> None:
    user = "signs-up-on-first-request"
    response = review.get("/signup", user, "POST")
    assert response.status_code == 201 and response.text == "tracked 200"
    # the exposure is queued when the exchange ends, after the conversion: the conversion waits for it

    def attributed() -> dict[str, Any] | None:
        results = review.results("price")
        return results if sum(r["conversions"] for r in results["goals"]["signup"]["variants"]) else None

    results = wait_for(attributed, timeout=10, interval=0.1, what="the conversion attributed")
    assert results["unattributed"] == 0
    assert sum(row["conversions"] for row in results["goals"]["signup"]["variants"]) == 1


@pytest.mark.slow  # two workers: make test-slow
def test_with_two_workers_a_conversion_tracked_right_after_its_exposure_is_attributed(
    origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    origin = origin_factory()
    config = CONFIG + f'\n[[origins]]\nprefix = "/"\nurl = "{origin.url}"\n'
    proxy = proxy_factory(config=config, flags=FLAGS, args=["--workers", "2"])
    users = [f"two-workers-{i}" for i in range(60)]
    for user in users:
        # new connections: the kernel spreads them over both workers, as it does a browser's
        with httpx.Client() as fresh:
            assert fresh.get(f"{proxy.base_url}/page", headers={"X-User-Id": user}).status_code == 200
        with httpx.Client() as fresh:
            tracked = fresh.post(
                f"{proxy.base_url}/__flags/api/track",
                headers={"Authorization": f"Bearer {TRACK}"},
                json={"key": user, "event": "buy"},
            )
        assert tracked.status_code == 200, tracked.text

    def all_counted() -> dict[str, Any] | None:
        with httpx.Client() as fresh:
            results: dict[str, Any] = fresh.get(
                f"{proxy.base_url}/__flags/api/experiments/price",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ).json()
        converted = sum(row["conversions"] for row in results["goals"]["buy"]["variants"])
        return results if converted + results["unattributed"] >= len(users) else None

    # a conversion that came before its exposure was written is asked about again 2 s later
    results = wait_for(all_counted, timeout=15, interval=0.2, what="every conversion settled")
    assert results["users"] == len(users)
    assert results["unattributed"] == 0
    assert sum(row["conversions"] for row in results["goals"]["buy"]["variants"]) == len(users)
