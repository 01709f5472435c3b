"""``POST /chat/telegram``: the Bot API webhook for ``/flag`` commands (docs/chatops.md).

Telegram signs nothing: the ``X-Telegram-Bot-Api-Secret-Token`` header (setWebhook's
``secret_token``) is the check, compared in constant time (401 otherwise). An update is recorded by
its ``update_id`` and answered 200 at once — a non-2xx answer makes Telegram send it again — and the
command runs in the background, its reply sent with ``sendMessage``. A repeated ``update_id`` is
answered 200 and does nothing.
"""

from __future__ import annotations

import hmac
import html
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.config import TelegramChatSettings
from proxy.control.bodies import read_json
from proxy.control.chat.commands import HELP, Usage, command_text, parse
from proxy.control.chat.executor import Actor, Reply, run
from proxy.control.chat.runtime import ChatRuntime
from proxy.control.deps import ControlDeps, deps_of
from proxy.control.problems import HTTPProblem

MAX_BODY = 1_048_576
MAX_TEXT = 4000  # Telegram's limit is 4096 characters a message
DELIVERY_TTL_S = 86_400  # a change's update_id is kept in the store this long (Telegram retries for less)


def rendered(reply: Reply) -> dict[str, Any]:
    """sendMessage fields for ``reply``: tables as HTML ``<pre>``, the rest as plain text."""
    text = reply.text if len(reply.text) <= MAX_TEXT else reply.text[: MAX_TEXT - 1] + "…"
    if reply.code:
        return {"text": f"<pre>{html.escape(text, quote=False)}</pre>", "parse_mode": "HTML"}
    return {"text": text}


def _user(message: dict[str, Any]) -> tuple[str, str]:
    """(the sender's id, how to name them)."""
    sender = message.get("from")
    if (
        not isinstance(sender, dict)
        or isinstance(sender.get("id"), bool)
        or not isinstance(sender.get("id"), int)
    ):
        return "", ""
    name = sender.get("username") or sender.get("first_name") or str(sender["id"])
    return str(sender["id"]), f"@{name}" if sender.get("username") else str(name)


async def answer(
    deps: ControlDeps,
    runtime: ChatRuntime,
    settings: TelegramChatSettings,
    update_id: int,
    message: dict[str, Any],
    text: str,
) -> None:
    """Run the command in ``text`` for the message's sender and send the reply into its chat."""
    user, name = _user(message)
    try:
        command = parse(text)
    except Usage as exc:
        reply = Reply(f"{exc}\n\n{HELP}", code=True)
    else:
        if command.changes and (not user or user not in settings.allowed_users):
            reply = Reply("not allowed: you may not change flags ([chat.telegram] allowed_users)")
        else:
            chat = message["chat"]["id"]
            actor = Actor(
                id=f"telegram:{user}",
                name=name,
                via="Telegram",
                telegram_chat=chat,
                delivery=f"telegram:{update_id}",
                delivery_ttl_s=DELIVERY_TTL_S,
            )
            reply = await run(deps, command, actor)
    payload: dict[str, Any] = {"chat_id": message["chat"]["id"], **rendered(reply)}
    if isinstance(message.get("message_id"), int):
        payload["reply_parameters"] = {
            "message_id": message["message_id"],
            "allow_sending_without_reply": True,
        }
    await runtime.outbox.send(runtime.telegram_url("sendMessage"), payload, "Telegram sendMessage")


async def webhook(request: Request) -> Response:
    deps = deps_of(request)
    runtime, settings = deps.chat, deps.settings.chat.telegram
    assert runtime is not None  # the route is mounted only with the runtime (build_control_app)
    token = request.headers.get("x-telegram-bot-api-secret-token", "")
    if not hmac.compare_digest(token.encode("latin-1", "replace"), settings.secret_token.encode()):
        raise HTTPProblem(
            401, "bad_token", "X-Telegram-Bot-Api-Secret-Token does not match [chat.telegram] secret_token"
        )
    update = await read_json(request, MAX_BODY)
    update_id = update.get("update_id") if isinstance(update, dict) else None
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise HTTPProblem(400, "bad_update", 'expected a Telegram Update: {"update_id": <integer>, ...}')
    if not runtime.telegram_seen.first_time(update_id):
        return JSONResponse({"status": "duplicate", "update_id": update_id})
    message = update.get("message")
    text = message.get("text") if isinstance(message, dict) else None
    chat = message.get("chat") if isinstance(message, dict) else None
    args = command_text(text, settings.bot_username) if isinstance(text, str) else None
    if args is None or not isinstance(chat, dict) or not isinstance(chat.get("id"), int):
        return JSONResponse({"status": "ignored", "update_id": update_id})  # not a /flag command for us
    assert isinstance(message, dict)
    if not runtime.outbox.spawn(
        answer(deps, runtime, settings, update_id, message, args), "Telegram command"
    ):
        # no room to run it, nor to reply: not recorded, so Telegram's retry (it retries non-2xx) runs it
        runtime.telegram_seen.forget(update_id)
        return JSONResponse(
            {"error": "busy", "detail": "too many chat posts pending ([chat] max_pending); retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "accepted", "update_id": update_id})


ROUTES = [Route("/telegram", webhook, methods=["POST"])]
