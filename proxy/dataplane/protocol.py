"""The client connection: uvicorn's httptools protocol, hardened for a proxy.

This subclass overrides ``data_received`` and calls private methods of uvicorn's
``HttpToolsProtocol`` (``_unset_keepalive_if_required``, ``_should_upgrade``,
``handle_websocket_upgrade``, ``_unsupported_upgrade_warning``): pyproject.toml pins uvicorn to the
minor versions this was checked against, and ``tests/test_protocol_contract.py`` fails on a uvicorn
that no longer has them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.errors import error_response_bytes

ACCESS_LOG = logging.getLogger("flagproxy.access")
UVICORN_PRIVATE_API = (
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "handle_websocket_upgrade",
    "_unsupported_upgrade_warning",
)


def new_request_id() -> str:
    return os.urandom(8).hex()


class HeadTooLarge(Exception):
    pass


class ProxyHttpProtocol(HttpToolsProtocol):
    """httptools, hardened for a proxy.

    - The header section is frozen once complete: uvicorn appends chunked trailer fields to the list
      it handed the app as ``scope["headers"]``, and RFC 9110 §6.5.1 forbids merging them (a trailer
      could otherwise add a Host or a flag key after the fact).
    - Malformed framing (Content-Length with Transfer-Encoding, duplicate or invalid Content-Length,
      bad chunks — RFC 9112 §6) gets a JSON 400 and the connection is closed.
    - A request head above ``max_head_bytes`` gets a JSON 431 and the connection is closed.
    """

    max_head_bytes = 65536
    on_reject: Callable[[str], None] | None = None  # counts rejections (set to the app's metrics)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            raise HeadTooLarge()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if self.scope.get("type") == "http":
            self.scope["headers"] = list(self.headers)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._reject(
                    431,
                    "request_head_too_large",
                    f"request line and headers exceed {self.max_head_bytes} bytes",
                )
            else:
                self._reject(400, "bad_request", f"malformed HTTP request: {exc}")
        else:
            # A head still incomplete after this much input is too large too (one endless header line).
            if getattr(self, "_in_head", False):
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._reject(
                        431, "request_head_too_large", f"request head exceeds {self.max_head_bytes} bytes"
                    )

    def _reject(self, status: int, error: str, detail: str) -> None:
        """Answer at once and close: after a framing error the byte stream cannot be trusted."""
        client = self.client[0] if self.client else None
        request_id = new_request_id()  # the head could not be trusted: a fresh id, not the client's
        # an access-log event when the access log is on, else uvicorn's error log at info
        logger = ACCESS_LOG if ACCESS_LOG.isEnabledFor(logging.INFO) else self.logger
        logger.info(
            "rejected a request from %s: %s",
            client,
            detail,
            extra={
                "event": "rejected",
                "status": status,
                "error": error,
                "client": client,
                "request_id": request_id,
            },
        )
        if self.on_reject is not None:
            self.on_reject(error)
        if not self.transport.is_closing():
            self.transport.write(error_response_bytes(status, error, detail, request_id))
            self.transport.close()
