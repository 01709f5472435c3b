"""uvicorn integration: how the proxy is served (protocol, workers)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import ConfigError, Settings, load_settings
from proxy.logs import logging_config

log = logging.getLogger("flagproxy")
ACCESS_LOG = logging.getLogger("flagproxy.access")
INPUTS_ENV = "FLAGPROXY__SERVE_INPUTS"  # how worker processes get the parent's settings inputs


class HeadTooLarge(Exception):
    pass


REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


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
        from proxy.forward import new_request_id  # not at import: proxy.metrics must wait (see run)

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
        body = json.dumps({"error": error, "detail": detail}).encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
            status,
            REASONS[status],
            len(body),
        )
        head += b"x-request-id: %s\r\n" % request_id.encode("ascii")
        if not self.transport.is_closing():
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
            self.transport.close()


def settings_from_inputs(inputs: dict[str, Any]) -> Settings:
    settings = load_settings(
        config_file=inputs.get("config"), overrides=inputs.get("overrides"), origins=inputs.get("origins")
    )
    if not settings.origins:
        raise ConfigError("origins: at least one origin is required (--origin [PREFIX=]URL or [[origins]])")
    return settings


def app_from_environment() -> Any:
    """The app factory each worker process calls (``--workers N``)."""
    return build_app(settings_from_inputs(json.loads(os.environ[INPUTS_ENV])))


def build_app(settings: Settings) -> Any:
    """The app, with the protocol set up for it (head limit, rejections counted in its metrics)."""
    from proxy.app import FlagProxy

    ProxyHttpProtocol.max_head_bytes = settings.server.max_request_head_bytes
    app = FlagProxy(settings)  # also validates flags and settings before anything listens
    ProxyHttpProtocol.on_reject = app.metrics.rejected
    return app


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client (and proxy.metrics)


def run(settings: Settings, inputs: dict[str, Any], workers: int = 1) -> None:
    # Metrics: several workers share a directory of mmap files (prometheus_client's multiprocess
    # mode). prometheus_client reads the variable once, when it is imported, so it is settled here
    # before the app (and prometheus_client) is imported: this supervising process must not write
    # there, its app below only validates the settings and flags.
    shared_dir = os.environ.pop(MULTIPROC_ENV, "") if workers > 1 else os.environ.get(MULTIPROC_ENV, "")
    if shared_dir and workers == 1:
        prepare_metrics_dir(shared_dir)
    app = build_app(settings)
    log_settings = settings.log
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": "uvloop",
        "http": ProxyHttpProtocol,
        "lifespan": "on",
        "access_log": False,  # the proxy writes its own ([log] access_log)
        "server_header": False,
        "date_header": False,
        # X-Forwarded-* trust is the proxy's own decision ([proxy] trusted_proxies), never uvicorn's.
        "proxy_headers": False,
        "log_config": logging_config(log_settings.level, log_settings.format, log_settings.access_log),
        "log_level": log_settings.level.lower(),
        "timeout_graceful_shutdown": settings.server.shutdown_grace_s,
    }
    if workers == 1:
        uvicorn.run(app, **options)
        return
    if not settings.store.redis_url:
        log.warning(
            "%d workers on the embedded memory store: a webhook or admin change reaches only the worker "
            "that received it; use --redis-url so every worker shares the flags",
            workers,
        )
    own_dir = not shared_dir
    shared_dir = shared_dir or tempfile.mkdtemp(prefix="flagproxy-metrics-")
    prepare_metrics_dir(shared_dir)
    os.environ[MULTIPROC_ENV] = shared_dir
    os.environ[INPUTS_ENV] = json.dumps(inputs)
    try:
        uvicorn.run("proxy.server:app_from_environment", factory=True, workers=workers, **options)
    finally:
        if own_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)


def prepare_metrics_dir(path: str) -> None:
    """Empty ``path`` of earlier runs' files, as prometheus_client requires before workers start."""
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)
