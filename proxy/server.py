"""uvicorn integration: the HTTP protocol the proxy is served with."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ProxyHttpProtocol(HttpToolsProtocol):
    """httptools, with the header section frozen once it is complete.

    uvicorn appends chunked trailer fields to the same list it handed the app as
    ``scope["headers"]``; RFC 9110 §6.5.1 forbids merging trailers into the header section (a
    trailer could otherwise add a Host or a flag key after the fact). The app gets a copy.
    """

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.scope.get("type") == "http":
            self.scope["headers"] = list(self.headers)
