"""Logging: one JSON object per line (``[log] format = "json"``) or plain text, for us and uvicorn.

A JSON event carries ``ts`` (UTC, ms), ``level``, ``logger``, ``msg``, ``pid`` and whatever the call
passed as ``extra`` (``request_id``, ``origin``; the access log adds method, path, status,
duration_ms, bytes_sent, client). Tracebacks go into ``exc`` as one string.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in event:
                event[name] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False, default=str)


# C0 controls, DEL, and the Unicode line and paragraph separators: a client-sent "%0a" in a path
# must not start a forged line in a text log
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with control characters in the message escaped: one event is one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for log lines)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def logging_config(level: str = "info", fmt: str = "json", access_log: bool = False) -> dict[str, Any]:
    """A ``dictConfig`` for this process and uvicorn's (it is applied again in every worker)."""
    level_name = level.upper()
    formatter: dict[str, Any] = (
        {"()": "proxy.logs.JsonFormatter"}
        if fmt.lower() == "json"
        else {"()": "proxy.logs.TextFormatter", "format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"flagproxy": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "flagproxy",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level_name},
        "loggers": {
            # uvicorn's loggers carry their own handlers by default: route them through ours instead
            "uvicorn": {"handlers": [], "level": level_name, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level_name, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "httpx": {"level": "WARNING"},  # no per-request lines from control-plane calls
            "watchfiles": {"level": "WARNING"},  # the flags file's watch: our own line says what it did
            # asked for explicitly, so shown whatever the level
            "flagproxy.access": {"level": "INFO" if access_log else "WARNING"},
        },
    }


def configure(level: str = "info", fmt: str = "json", access_log: bool = False) -> dict[str, Any]:
    config = logging_config(level, fmt, access_log)
    logging.config.dictConfig(config)
    return config


def set_level(level: str) -> None:
    """A new ``[log] level`` (a reload): the root logger and uvicorn's, as ``logging_config`` sets."""
    for name in ("", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
