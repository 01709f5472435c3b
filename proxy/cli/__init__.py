"""``flagproxy`` console script."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from proxy.config import ConfigError, load_settings
from proxy.engine import FlagError
from proxy.sources.registry import UnknownSource

EXIT_CONFIG = 2


def _setup_logging(level: str | None) -> None:
    """Plain text for the one-shot commands; ``serve`` switches to its [log] settings."""
    logging.basicConfig(
        level=getattr(logging, (level or "info").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request lines from control-plane calls


def _serve_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """What settings are built from (besides the environment): also handed to every worker process."""
    return {
        "config": args.config,
        "overrides": {
            "server": {"host": args.host, "port": args.port},
            "store": {"flags_file": args.flags, "redis_url": args.redis_url, "allow_empty": args.allow_empty},
            "log": {"level": args.log_level, "format": args.log_format, "access_log": args.access_log},
        },
        "origins": args.origin or None,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.reload import hold_early_sighup
    from proxy.server import run, settings_from_inputs

    hold_early_sighup()  # systemd may reload while the proxy is still starting
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    from proxy.logs import configure

    inputs = _serve_inputs(args)
    settings = settings_from_inputs(inputs)
    configure(settings.log.level, settings.log.format, settings.log.access_log)
    run(settings, inputs, workers=args.workers)
    return 0


def cmd_demo_origin(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.cli.demo_origin import echo_app
    from proxy.logs import logging_config

    uvicorn.run(
        echo_app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        log_config=logging_config(args.log_level or "info", args.log_format),  # as the proxy's
        log_level=args.log_level or "info",
    )
    return 0


def _attr_value(text: str) -> Any:
    """``--attr`` values are JSON when they parse as JSON (30, true), strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_eval(args: argparse.Namespace) -> int:
    from proxy.cli.evaluate import evaluate_all, evaluate_lines
    from proxy.dataplane.context import make_context
    from proxy.sources.registry import DEFAULT

    try:
        flags = DEFAULT.load_file(args.source, args.flags, args.segments)
    except UnknownSource as exc:
        print(f"flagproxy: --source: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:  # FlagError included
        print(f"flagproxy: invalid flags in {args.flags}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ordered = [flags[k] for k in sorted(flags)]
    if args.key is not None:
        attributes = {}
        for item in args.attr or []:
            name, sep, value = item.partition("=")
            if not sep or not name:
                print(f"flagproxy: --attr {item!r}: expected name=value", file=sys.stderr)
                return EXIT_CONFIG
            attributes[name] = _attr_value(value)
        context = make_context(args.key, attributes, args.bucketing_key)
        print(json.dumps(evaluate_all(ordered, context), separators=(",", ":"), ensure_ascii=False))
        return 0
    stream = sys.stdin if args.keys_file == "-" else open(args.keys_file, encoding="utf-8")  # noqa: SIM115
    out = sys.stdout
    # a source may read its own context objects and answer in its SDK's terms (Unleash does)
    own_lines = getattr(DEFAULT.get(args.source), "evaluate_lines", None)
    try:
        with stream:
            lines = evaluate_lines(ordered, stream) if own_lines is None else own_lines(flags, stream)
            for line in lines:
                out.write(line)
                out.write("\n")
    except ValueError as exc:  # KeysFileError, or the source's own line errors
        print(f"flagproxy: {args.keys_file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    """Print the pre-flight worst case per route; exit 1 when a route can exceed its budget."""
    from proxy.dataplane.preflight import render, worst_case
    from proxy.sources.registry import DEFAULT

    settings = load_settings(config_file=args.config, overrides={"store": {"flags_file": args.flags}})
    flags = DEFAULT.load_file(args.source, settings.store.flags_file, args.segments)
    rows = worst_case(settings, flags)
    print(render(rows))
    over = [r for r in rows if r.worst_bytes > r.budget]
    if over:
        print(f"\n{len(over)} route(s) can exceed the request-header budget.", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flagproxy", description="Feature-flag reverse proxy.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info (serve: [log] level)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from proxy.sources.registry import DEFAULT

    sources = ", ".join(DEFAULT.names)

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--config", metavar="FILE", help="TOML settings file")
    serve.add_argument(
        "--origin", action="append", metavar="[PREFIX=]URL", help="origin to forward to (repeatable)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--flags", metavar="FILE", help="native flags JSON for the embedded store")
    serve.add_argument("--redis-url", metavar="URL", help="Redis flag store, e.g. redis://127.0.0.1:6379/0")
    serve.add_argument(
        "--allow-empty",
        action="store_const",
        const=True,
        help="start even with no flags (else refused: usually a flags file that was not found)",
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-format", choices=["json", "text"], help="log lines as JSON (default) or text")
    serve.add_argument(
        "--access-log", action="store_const", const=True, help="one log event per request ([log] access_log)"
    )
    serve.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", parents=[common], help="print the flag values a key would get")
    ev.add_argument("--flags", required=True, metavar="FILE", help="flag definitions")
    ev.add_argument("--source", default="native", help=f"format of --flags: {sources} (default native)")
    ev.add_argument("--segments", metavar="DIR", help="split: segmentChanges files <name>.json")
    who = ev.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="evaluate for one key; prints {flagKey: value}")
    who.add_argument(
        "--keys-file",
        metavar="KEYS.jsonl",
        help="a key or {key, bucketingKey, attributes} a line (unleash: a context object a line); - = stdin",
    )
    ev.add_argument("--attr", action="append", metavar="NAME=VALUE", help="attribute for --key (repeatable)")
    ev.add_argument("--bucketing-key", help="separate bucketing key for --key")
    ev.set_defaults(func=cmd_eval)

    budget = sub.add_parser("budget", parents=[common], help="worst-case request-header size per route")
    budget.add_argument("--config", metavar="FILE", help="TOML settings (budget, origins, flags file)")
    budget.add_argument("--flags", metavar="FILE", help="flag definitions (default: [store] flags_file)")
    budget.add_argument("--source", default="native", help=f"format of --flags: {sources} (default native)")
    budget.add_argument("--segments", metavar="DIR", help="split: segmentChanges files <name>.json")
    budget.set_defaults(func=cmd_budget)

    from proxy.cli.flags import add_parser as add_flags_parser

    add_flags_parser(sub, [common])

    from proxy.cli.experiments import add_parser as add_experiments_parser

    add_experiments_parser(sub, [common])

    demo = sub.add_parser("demo-origin", parents=[common], help="run an echo API to put behind the proxy")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9000)
    demo.add_argument(
        "--log-format", choices=["json", "text"], default="json", help="log lines (default json)"
    )
    demo.set_defaults(func=cmd_demo_origin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, UnknownSource) as exc:
        print(f"flagproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FlagError as exc:
        print(f"flagproxy: invalid flags: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"flagproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal: no traceback
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
