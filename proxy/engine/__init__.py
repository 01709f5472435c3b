"""Pure flag evaluation: no I/O, no web imports.

Documents are validated and compiled once (``compile_document``) into ``Flag`` objects whose
``evaluate(context)`` returns a pre-encoded ``Served`` outcome.
"""

from proxy.engine.model import (
    Flag,
    FlagError,
    Served,
    compile_document,
    compile_flag,
    encode_json,
    glob_to_regex,
    with_override,
)

__all__ = [
    "Flag",
    "FlagError",
    "Served",
    "compile_document",
    "compile_flag",
    "encode_json",
    "glob_to_regex",
    "with_override",
]
