"""X-Request-Id: generated when absent, passed to the origin, returned to the client."""

from __future__ import annotations

import re

import httpx
import pytest
from support import http_response, raw_exchange, raw_request


@pytest.fixture(scope="module")
def proxy(proxy_factory, origin):
    return proxy_factory([origin.url])


def test_generated_when_absent_same_id_upstream_and_back(proxy, origin) -> None:
    response = httpx.get(f"{proxy.base_url}/rid/new", headers={"X-User-Id": "u"})
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert origin.only_request_to("/rid/new").values("X-Request-Id") == [rid]
    other = httpx.get(f"{proxy.base_url}/rid/new2", headers={"X-User-Id": "u"}).headers["x-request-id"]
    assert other != rid


def test_a_sane_client_id_is_kept_a_hostile_one_replaced(proxy, origin) -> None:
    kept = httpx.get(f"{proxy.base_url}/rid/kept", headers={"X-Request-Id": "abc-123.Z:9"})
    assert kept.headers["x-request-id"] == "abc-123.Z:9"
    assert origin.only_request_to("/rid/kept").values("X-Request-Id") == ["abc-123.Z:9"]
    request = raw_request("GET", "/rid/hostile", [("X-Request-Id", 'x" onload=<script> ' + "a" * 300)])
    reply = raw_exchange(proxy.port, request)
    sent = origin.only_request_to("/rid/hostile").values("X-Request-Id")
    assert len(sent) == 1 and re.fullmatch(r"[0-9a-f]{16}", sent[0])
    assert dict((n.lower(), v) for n, v in reply.headers)["x-request-id"] == sent[0]


def test_error_responses_carry_the_id(proxy_factory) -> None:
    dead = proxy_factory(["http://127.0.0.1:9"])
    response = httpx.get(f"{dead.base_url}/x", headers={"X-Request-Id": "trace-1"})
    assert response.status_code == 502 and response.headers["x-request-id"] == "trace-1"


def test_the_client_gets_the_id_the_origin_was_sent_even_if_the_origin_answers_its_own(proxy, origin) -> None:
    origin.route("/rid/echo-own", http_response(200, [("X-Request-Id", "origin-own-id")], b"ok"))
    response = httpx.get(f"{proxy.base_url}/rid/echo-own", headers={"X-Request-Id": "client-id"})
    assert origin.only_request_to("/rid/echo-own").values("X-Request-Id") == ["client-id"]
    assert response.headers.get_list("x-request-id") == ["client-id"]


def test_answers_of_the_proxy_itself_carry_an_id(proxy_factory, origin) -> None:
    routed = proxy_factory([f"/only={origin.url}"])
    no_route = httpx.get(f"{routed.base_url}/elsewhere", headers={"X-Request-Id": "nr-1"})
    assert no_route.status_code == 404 and no_route.headers["x-request-id"] == "nr-1"
    fresh = httpx.get(f"{routed.base_url}/elsewhere").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", fresh)
    request = raw_request("GET", "/only/x", [("Host", "b"), ("X-Request-Id", "bad-1")])  # two Hosts
    reply = raw_exchange(routed.port, request)
    assert reply.status == 400 and dict((n.lower(), v) for n, v in reply.headers)["x-request-id"] == "bad-1"
    health = httpx.get(f"{routed.base_url}/__flags/healthz", headers={"X-Request-Id": "probe-7"})
    assert health.status_code == 200 and health.headers["x-request-id"] == "probe-7"
