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
        access_log.info(
            "%s %s %d %.1fms",
            exchange.method,
            exchange.path,
            status,
            duration_ms,
            extra={
                "event": "request",
                "method": exchange.method,
                "path": exchange.path,
                "status": status,
                "duration_ms": duration_ms,
                "bytes_sent": exchange.bytes_sent,
                "client": exchange.client,
                "origin": exchange.origin_label,
                "request_id": exchange.request_id,
            },
        )
