"""Pure flag evaluation: no I/O, no web imports.

Documents are validated and compiled once (``compile_document``) into ``Flag`` objects whose
``evaluate(context)`` returns a pre-encoded ``Served`` outcome.

- ``flag``: the types (``Context``, ``Flag``, ``Served``, ``FlagError``) and ``with_override``.
- ``native``: the native document schema, validated and compiled into flags.
- ``routes``: route globs that limit a flag to some request paths (matched without backtracking).
- ``patterns``: regular expressions in linear time (RE2), for targeting conditions.
- ``bucketing``: consistent hashing of a context into one of 10,000 buckets.
- ``jsonlogic``: targeting conditions (JsonLogic) compiled into closures.
- ``semver``: semantic-version parsing and precedence for the ``sem_ver`` operator.
"""

from proxy.engine.bucketing import make_bucketer
from proxy.engine.flag import (
    Context,
    Experiment,
    Flag,
    FlagError,
    Served,
    encode_json,
    variant_name,
    with_override,
)
from proxy.engine.native import compile_document, compile_flag
from proxy.engine.routes import glob_matcher, glob_to_regex

__all__ = [
    "Context",
    "Experiment",
    "Flag",
    "FlagError",
    "Served",
    "compile_document",
    "compile_flag",
    "encode_json",
    "glob_matcher",
    "glob_to_regex",
    "make_bucketer",
    "variant_name",
    "with_override",
]
