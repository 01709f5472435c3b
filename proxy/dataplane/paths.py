"""Request paths as origins read them: dot segments, encoded separators, repeated slashes.

Routing, route globs and the control-prefix check see the *normalised* path; the origin still gets
the bytes the client sent. Normalising follows RFC 3986 §5.2.4 (remove dot segments) after reading
the path the way common origins do, so that what the proxy routes is what the origin serves:

- percent-escapes are decoded (``%2e%2e`` is ``..``), and ``%2F``, ``%5C`` and ``\\`` separate
  segments (nginx, IIS and many frameworks decode and merge them);
- repeated separators are one (``//__flags/`` is ``/__flags/``, nginx's ``merge_slashes``);
- a segment whose part before ``;`` is ``.`` or ``..`` is a dot segment (Tomcat and Jetty read
  ``/..;x/`` as ``/../``).

A path whose ``..`` segments would climb above the root is refused (400), and so is one that would
climb above an origin's base path once its route prefix is stripped.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_SEPARATORS = re.compile(r"[/\\]+")


def normalise(raw_path: bytes) -> str | None:
    """The decoded path with dot segments removed and separators merged; None when it climbs above
    the root. ``*`` (``OPTIONS *``) stays ``*``."""
    if raw_path == b"*":
        return "*"
    text = unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="replace")
    if "." not in text and "\\" not in text and "//" not in text:
        return text if text.startswith("/") else "/" + text  # the common case: nothing to do
    segments = _SEPARATORS.split(text)
    out: list[str] = []
    directory = False  # the path ends with a separator (or a dot segment, which names a directory)
    for segment in segments:
        dot = segment.partition(";")[0]
        if dot == ".":
            directory = True
        elif dot == "..":
            if not out:
                return None
            out.pop()
            directory = True
        elif segment:
            out.append(segment)
            directory = False
        else:
            directory = True
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if directory else "")


def climbs(raw_path: bytes) -> bool:
    """Whether ``raw_path`` read as an origin reads it climbs above its own root."""
    return normalise(raw_path) is None
