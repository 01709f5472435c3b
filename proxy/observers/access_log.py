"""The access log: one event per request (``[log] access_log``)."""

from __future__ import annotations

import logging

from proxy.dataplane.exchange import Exchange

access_log = logging.getLogger("flagproxy.access")


class AccessLog:
    name = "access_log"
    inline = True  # a log call; the handlers write to stderr

    def observe(self, exchange: Exchange) -> None:
        duration_ms = round(exchange.duration_s * 1000, 3)
        status = exchange.status or 499  # the client went away before a response started
        extra: dict[str, object] = {
            "event": "request",
            "method": exchange.method,
            "path": exchange.path,
            "status": status,
            "duration_ms": duration_ms,
            "bytes_sent": exchange.bytes_sent,
            "client": exchange.client,
            "origin": exchange.origin_label,
            "request_id": exchange.request_id,
        }
        if exchange.cut is not None:  # the response started but was cut short: never a clean status
            extra["cut"] = exchange.cut
        if exchange.upgraded:
            extra["upgraded"] = True
        message = "%s %s %d %.1fms"
        if exchange.cut is not None:
            message += " cut: " + exchange.cut.replace("%", "%%")
        access_log.info(message, exchange.method, exchange.path, status, duration_ms, extra=extra)
