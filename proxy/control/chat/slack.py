"""``POST /chat/slack``: the ``/flag`` slash command (docs/chatops.md).

Verified on the raw body before anything is parsed: ``X-Slack-Signature`` is ``v0=<hex
HMAC-SHA256(signing_secret, "v0:<X-Slack-Request-Timestamp>:<body>")>``, compared in constant time;
a timestamp more than 300 s from the proxy's clock, or a signature already accepted, is refused (401).
Slack waits 3 s for the answer: a command done within ``[chat.slack] reply_within_s`` is answered
inline, a slower one is acknowledged and its reply posted to the request's ``response_url``.
Replies are ephemeral (only the caller sees them); changes are announced.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.alerts import mrkdwn_escape
from proxy.config import SlackChatSettings
from proxy.control.bodies import read_body
from proxy.control.chat.commands import HELP, Command, Usage, parse
from proxy.control.chat.executor import Actor, Reply, run
from proxy.control.chat.runtime import REPLAY_WINDOW_S, ChatRuntime
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.problems import HTTPProblem

MAX_BODY = 16_384  # a slash command's form is well under 4 KiB
MAX_TIMESTAMP_DIGITS = 12


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, signature: str, body: bytes, now: float) -> None:
    """401 unless ``signature`` is Slack's for ``timestamp`` and ``body``, within 300 s of ``now``."""
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= MAX_TIMESTAMP_DIGITS):
        raise HTTPProblem(401, "bad_signature", "X-Slack-Request-Timestamp is missing or not a Unix time")
    expected = expected_signature(secret, timestamp, body)
    if not hmac.compare_digest(signature.encode("latin-1", "replace"), expected.encode()):
        raise HTTPProblem(401, "bad_signature", "X-Slack-Signature does not match the timestamp and body")
    skew = now - int(timestamp)
    if abs(skew) > REPLAY_WINDOW_S:
        raise HTTPProblem(
            401,
            "signature_expired",
            f"X-Slack-Request-Timestamp is {abs(skew):.0f} s {'old' if skew > 0 else 'ahead'} "
            f"(tolerance {REPLAY_WINDOW_S} s): a replayed request, or a clock is off",
        )


def allowed(settings: SlackChatSettings, user: str, channel: str) -> bool:
    if user not in settings.allowed_users:
        return False
    return not settings.allowed_channels or channel in settings.allowed_channels


def rendered(reply: Reply) -> str:
    text = mrkdwn_escape(reply.text)
    return f"```\n{text}\n```" if reply.code else text


def slack_unescape(text: str) -> str:
    """Slack sends ``&``, ``<`` and ``>`` in a command's text as ``&amp;``, ``&lt;`` and ``&gt;``."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def ephemeral(text: str) -> dict[str, Any]:
    return {"response_type": "ephemeral", "text": text}


def _runtime(deps: ControlDeps) -> ChatRuntime:
    assert deps.chat is not None  # the route is mounted only with the runtime (build_control_app)
    return deps.chat


async def _reply_later(runtime: ChatRuntime, task: asyncio.Task[Reply], response_url: str) -> None:
    reply = await task
    payload = {**ephemeral(rendered(reply)), "replace_original": False}
    await runtime.outbox.send(response_url, payload, "Slack response_url reply")


async def slash_command(request: Request) -> Response:
    deps = deps_of(request)
    runtime, settings = _runtime(deps), deps.settings.chat.slack
    body = await read_body(request, MAX_BODY)
    signature = request.headers.get("x-slack-signature", "")
    verify(
        settings.signing_secret,
        request.headers.get("x-slack-request-timestamp", ""),
        signature,
        body,
        time.time(),
    )
    if not runtime.slack_seen.first_time(signature):
        raise HTTPProblem(401, "replayed", "this signed request was already received")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise HTTPProblem(400, "bad_form", "the body is not a UTF-8 form") from None
    field = {name: values[0] for name, values in form.items()}
    user, channel = field.get("user_id", ""), field.get("channel_id", "")
    try:
        command: Command = parse(slack_unescape(field.get("text", "")))
    except Usage as exc:
        return JSONResponse(ephemeral(rendered(Reply(f"{exc}\n\n{HELP}", code=True))))
    if command.changes and not allowed(settings, user, channel):
        where = " in this channel" if user in settings.allowed_users else ""
        setting = "allowed_channels" if where else "allowed_users"
        return JSONResponse(
            ephemeral(f"not allowed: you may not change flags{where} ([chat.slack] {setting})")
        )
    actor = Actor(
        id=f"slack:{user}",
        name=f"@{field.get('user_name') or user}",
        via="Slack",
        delivery=f"slack:{signature.removeprefix('v0=')}",  # a replay to another instance applies nothing
        delivery_ttl_s=2 * REPLAY_WINDOW_S,  # the timestamp may be up to 300 s either side of now
    )
    task = asyncio.create_task(run(deps, command, actor), name="flagproxy-chat slack command")
    runtime.outbox.keep(task)
    response_url = field.get("response_url", "")
    can_defer = urlsplit(response_url).scheme in ("http", "https")
    done, _ = await asyncio.wait({task}, timeout=settings.reply_within_s if can_defer else None)
    if task in done:
        return JSONResponse(ephemeral(rendered(task.result())))
    if not runtime.outbox.spawn(_reply_later(runtime, task, response_url), "Slack response_url reply"):
        return JSONResponse(ephemeral(rendered(await task)))
    return JSONResponse(ephemeral(f"working on `/flag {mrkdwn_escape(command.name)}`…"))


ROUTES = [Route("/slack", slash_command, methods=["POST"])]
