"""The native format (docs/flags.md): documents are compiled directly by the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxy.engine import Flag, FlagError, compile_document


def parse_document(text: str | bytes, where: str = "document") -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlagError(where, f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise FlagError(where, "expected a JSON object with a 'flags' object")
    return document


def load_file(path: str | Path) -> dict[str, Flag]:
    return compile_document(parse_document(Path(path).read_bytes(), str(path)))
