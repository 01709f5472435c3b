"""A fake Unleash server for the sync tests: a real HTTP server on 127.0.0.1 answering
``GET /api/client/features`` as Unleash does (client-token auth, ETag ``"<hash>:<revision>"``, 304
on a matching ``If-None-Match``), with switches for failures (HTTP 500, garbage, slowness)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_TOKEN = "default:production.0123456789abcdef"


class FakeUnleash:
    def __init__(self) -> None:
        self.features: list[dict[str, Any]] = []
        self.segments: list[dict[str, Any]] = []
        self.revision = 1
        self.mode = "ok"  # ok | error | garbage | slow | no-revision
        self.slow_s = 3.0
        self.requests: list[dict[str, str]] = []  # the headers of every request
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                with api.lock:
                    api.requests.append({k.lower(): v for k, v in self.headers.items()})
                    mode, body, etag = api.mode, api.body(), api.etag()
                if self.path != "/api/client/features":
                    return self.reply(404, b"{}")
                if self.headers.get("Authorization") != CLIENT_TOKEN:
                    return self.reply(401, b'{"message": "invalid token"}')
                if mode == "error":
                    return self.reply(500, b"{}")
                if mode == "garbage":
                    return self.reply(200, b"<html>maintenance</html>")
                if mode == "slow":
                    time.sleep(api.slow_s)
                if mode != "no-revision" and self.headers.get("If-None-Match") == etag:
                    return self.reply(304, b"", etag)
                return self.reply(200, json.dumps(body).encode(), None if mode == "no-revision" else etag)

            def reply(self, status: int, data: bytes, etag: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": 2, "features": self.features, "segments": self.segments}
        if self.mode != "no-revision":
            body["meta"] = {"revisionId": self.revision, "etag": self.etag()}
        return body

    def etag(self) -> str:
        digest = hashlib.sha256(json.dumps([self.features, self.segments]).encode()).hexdigest()[:8]
        return f'"{digest}:{self.revision}"'

    def publish(self, features: list[dict[str, Any]], segments: list[dict[str, Any]] | None = None) -> None:
        with self.lock:
            self.features = features
            self.segments = segments or []
            self.revision += 1

    def start(self) -> FakeUnleash:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def feature(name: str, enabled: bool = True, **extra: Any) -> dict[str, Any]:
    return {"name": name, "enabled": enabled, "strategies": [{"name": "default"}], "variants": [], **extra}
