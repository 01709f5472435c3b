"""Request paths as origins read them: dot segments, encoded separators, repeated slashes.

Routing, route globs and the control-prefix check see the *normalised* path; the origin still gets
the bytes the client sent. That is safe only when every origin reads those bytes the same way, so
a path is read twice:

- **broadly**, as the most lenient origins do: percent-escapes decoded (``%2e%2e`` is ``..``),
  ``%2F``, ``%5C`` and ``\\`` separating segments (nginx decodes ``%2F``; IIS splits on ``\\``),
  repeated separators merged (nginx's ``merge_slashes``), and a segment whose part before ``;`` is
  ``.`` or ``..`` taken as a dot segment (Tomcat and Jetty read ``/..;x/`` as ``/../``);
- **strictly**, as RFC 3986 §5.2.4 says: segments split on ``/`` only, a segment is a dot segment
  only when it decodes to exactly ``.`` or ``..``, empty segments kept.

When the path has dot segments and the two readings differ, the path is refused (400): the
proxy cannot know which one the origin will serve. So is a path whose ``..`` climbs above the
root, and one that would climb above an origin's base path once its route prefix is stripped. A
``#`` ends the path, as nginx and URL parsers read it, but not when dots or escapes follow it (a
server taking it literally would resolve them). Otherwise the broad reading is the path (a path
without dot segments, ``\\`` or ``//`` is just decoded).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote

_SEPARATORS = re.compile(r"[/\\]+")


class BadPath(ValueError):
    """The path cannot be routed safely; the message says why (the 400 body's detail)."""


def _decode(text: str) -> str:
    return unquote(text, encoding="utf-8", errors="replace")


def _resolve(segments: list[str], is_dot: Callable[[str], str]) -> list[str] | None:
    """Segments with dot segments removed (RFC 3986 §5.2.4); None when ``..`` climbs above the root.
    The last entry is "" when the path ends as a directory."""
    out: list[str] = []
    directory = False
    for segment in segments:
        dot = is_dot(segment)
        if dot == ".":
            directory = True
        elif dot == "..":
            if not out:
                return None
            out.pop()
            directory = True
        else:
            out.append(segment)
            directory = False
    if directory:
        out.append("")
    return out


def _broad_dot(segment: str) -> str:
    return segment.partition(";")[0]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def normalise(raw_path: bytes, keep_under: str = "") -> str:
    """The path routing sees (decoded, dot segments removed, separators merged); ``BadPath`` when it
    climbs above the root or the origins could read it differently, or when its dot segments lead a
    path under ``keep_under`` (the control prefix) out of it. ``*`` (``OPTIONS *``) stays."""
    if raw_path == b"*":
        return "*"
    text = raw_path.decode("latin-1")
    if "#" in text:  # nginx and URL parsers stop there
        text, _, fragment = text.partition("#")
        if "." in fragment or "%" in fragment or "\\" in fragment:
            raise BadPath(
                "a '#' in the path followed by dot segments or escapes: servers read it differently"
            )
    decoded = _decode(text)
    if "." not in decoded and "\\" not in decoded and "//" not in decoded:
        return decoded if decoded.startswith("/") else "/" + decoded  # nothing to resolve
    parts = _SEPARATORS.split(decoded)  # merged: only a leading and a trailing "" can be empty
    broad = _resolve(parts[1:] if parts[0] == "" else parts, _broad_dot)
    if broad is None:
        raise BadPath("the path's '..' segments climb above the root")
    strict = _resolve(text.split("/")[1:] if text.startswith("/") else text.split("/"), _decode)
    if strict is None:
        raise BadPath("the path's '..' segments climb above the root")
    broadly = "/" + "/".join(broad)
    strictly = _decode("/" + "/".join(strict))
    if broadly != re.sub("/{2,}", "/", strictly) and any(_broad_dot(s) in (".", "..") for s in parts):
        raise BadPath(
            "servers read this path differently (dot segments with '\\', '%5C', '%2F', ';' or '//'): "
            "send it without dot segments"
        )
    if keep_under and _under(decoded, keep_under) and not _under(broadly, keep_under):
        raise BadPath(f"a path under {keep_under} may not leave it")
    return broadly


def climbs(raw_path: bytes) -> bool:
    """Whether ``raw_path`` read as an origin reads it climbs above its own root (or is ambiguous)."""
    try:
        normalise(raw_path)
    except BadPath:
        return True
    return False
