"""``flagproxy flags …``: a small client for the admin API (httpx, control plane only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    flags = sub.add_parser("flags", parents=parents, help="list and change flags through the admin API")
    env = os.environ
    flags.add_argument(
        "--url", default=env.get("FLAGPROXY_URL", "http://127.0.0.1:8080"), help="proxy base URL"
    )
    flags.add_argument("--token", default=env.get("FLAGPROXY_ADMIN_TOKEN", ""), help="admin bearer token")
    flags.add_argument("--prefix", default="/__flags", help="control-plane prefix (default /__flags)")
    actions = flags.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every flag with its source and definition")
    stale = actions.add_parser(
        "stale", help="potentially stale flags: owner, type, reasons (docs/lifecycle.md)"
    )
    stale.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    for name, text in (
        ("get", "one flag"),
        ("delete", "delete a native flag"),
        ("kill", "serve everyone the default"),
        ("restore", "remove a kill or promotion"),
    ):
        actions.add_parser(name, help=text).add_argument("key")
    put = actions.add_parser("set", help="create or replace a native flag from a JSON definition")
    put.add_argument("key")
    put.add_argument("file", help="JSON file with the definition, or - for stdin")
    promote = actions.add_parser("promote", help="serve one variant to 100 %% of traffic")
    promote.add_argument("key")
    promote.add_argument("variant")
    flags.set_defaults(func=run)


def _request(args: argparse.Namespace) -> tuple[str, str, Any]:
    path = f"{args.prefix}/api/flags"
    key = getattr(args, "key", None)
    if key is not None:
        path += "/" + httpx.URL(path="/" + key).raw_path.decode()[1:]
    action = args.action
    if action == "stale":
        return "GET", f"{args.prefix}/api/stale", None
    if action == "list" or action == "get":
        return "GET", path, None
    if action == "delete":
        return "DELETE", path, None
    if action in ("kill", "restore"):
        return "POST", f"{path}/{action}", None
    if action == "promote":
        variant: Any = args.variant
        if variant in ("true", "false"):
            variant = variant == "true"
        return "POST", f"{path}/promote", {"variant": variant}
    text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
    try:
        return "PUT", path, json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"flagproxy: {args.file}: not valid JSON: {exc}") from None


def run(args: argparse.Namespace) -> int:
    method, path, body = _request(args)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"flagproxy: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        payload = response.json()
    except ValueError:
        payload = {"status": response.status_code, "body": response.text}
    out = sys.stdout if response.is_success else sys.stderr
    if args.action == "stale" and response.is_success and not args.json and isinstance(payload, dict):
        print(stale_table(payload), file=out)
        return 0
    print(json.dumps(payload, indent=2, ensure_ascii=False), file=out)
    return 0 if response.is_success else 1


def stale_table(payload: dict[str, Any]) -> str:
    """``GET /api/stale`` as a table: flag, owner, type, reasons, since."""
    rows = [
        (
            str(s.get("flag", "")),
            str(s.get("owner") or "-"),
            str(s.get("type") or "-"),
            ",".join(s.get("reasons", [])),
            str(s.get("since", "")),
        )
        for s in payload.get("stale", [])
    ]
    if not rows:
        return f"no potentially stale flags (checked {payload.get('checked_at', '')})"
    header = ("FLAG", "OWNER", "TYPE", "REASONS", "SINCE")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]
    lines.append(f"{len(rows)} potentially stale (checked {payload.get('checked_at', '')})")
    return "\n".join(lines)
