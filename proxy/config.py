"""Settings: defaults < TOML file < environment < command line.

Every scalar setting ``[section] key`` can be overridden by the environment variable
``FLAGPROXY_<SECTION>_<KEY>``. Origins are an array of tables (``[[origins]]``) in the file,
``FLAGPROXY_ORIGINS`` (comma-separated ``[PREFIX=]URL``) in the environment and repeated
``--origin`` on the command line; a higher layer replaces the whole list.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.origin import FlagHeaderNames

ENV_PREFIX = "FLAGPROXY_"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


EXPERIMENT_BACKENDS = ("auto", "sqlite", "redis")


class ConfigError(ValueError):
    """A setting is missing, malformed or inconsistent; the message names the field."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    control_prefix: str = "/__flags"
    max_request_head_bytes: int = 65536
    shutdown_grace_s: float = 10.0
    header_timeout_s: float = 30.0  # a client's request head must arrive within this (408 + close)
    body_idle_timeout_s: float = 60.0  # longest silence inside a request body (0 = none)
    send_idle_timeout_s: float = 60.0  # longest a client may keep its receive window shut (0 = none)
    keepalive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 10000  # open client connections per worker; beyond it refused (503)
    control_port: int = 0  # serve the control plane on its own port (same host), not the traffic port


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    pool_timeout_s: float = 10.0
    pool_limit: int = 256
    keepalive_timeout_s: float = 15.0
    stream_idle_timeout_s: float = 300.0  # silence between response body chunks (0 = none)
    total_timeout_s: float = 0.0  # the whole exchange, request head to response end (0 = none)
    max_response_head_bytes: int = 65536  # the origin's status line and headers
    forward_expect: bool = False  # pass Expect: 100-continue on instead of answering it


@dataclass(frozen=True)
class ProxySettings:
    trusted_proxies: tuple[str, ...] = ()
    via: str = "flagproxy"
    rewrite_host: bool = False
    underscore_headers: str = "drop"  # request header names with "_": "drop", "reject" (400) or "pass"


@dataclass(frozen=True)
class HeaderSettings:
    name: str = "X-Feature-Flags"
    config_name: str = ""  # "" = <name>-Config; set, it must start with "<name>-"
    limit_bytes: int = 10240
    reserve_bytes: int = 512
    alert_ratio: float = 0.8
    typical_request_bytes: int = 1500
    signature_secret: str = ""
    omitted_keys: bool = True  # name the flags left out in <name>-Omitted-Keys when room allows


@dataclass(frozen=True)
class ContextSettings:
    key_sources: tuple[str, ...] = ("jwt", "telegram", "header", "cookie", "query")  # verified first
    key_header: str = "X-User-Id"
    key_cookie: str = ""
    key_query: str = ""
    jwt_claim: str = "sub"
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_verify: bool = True
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_require_exp: bool = False  # a token without `exp` is not accepted
    telegram_bot_token: str = ""
    telegram_header: str = "X-Telegram-Init-Data"
    telegram_max_age_s: int = 86400
    anonymous_cookie: str = "flag_uid"
    anonymous_max_age_s: int = 31536000
    anonymous_cookie_secure: bool = False
    cookie_secret: str = ""  # HMAC-signs the anonymous cookie; a cookie failing the check is replaced
    identity_cache_bytes: int = 8_388_608  # per verification cache (JWT, Telegram), per worker
    header_attributes: tuple[str, ...] = ()
    query_attributes: tuple[str, ...] = ()
    jwt_attributes: tuple[str, ...] = ()
    cookie_attributes: tuple[str, ...] = ()
    # the caller's address (the peer, or its nearest untrusted X-Forwarded-For hop) as this attribute
    client_address_attribute: str = ""


DEFAULT_FLAGS_FILE = "seeds/flags.json"


@dataclass(frozen=True)
class StoreSettings:
    flags_file: str = DEFAULT_FLAGS_FILE  # relative: to the TOML file that names it, else to the cwd
    allow_empty: bool = False  # serve with no flags at all (--allow-empty); else refuse to start
    watch_flags_file: bool = True  # an edited flags file is validated and applied (and on SIGHUP)
    redis_url: str = ""
    redis_cluster: bool = False  # redis_url names any node of a Redis Cluster
    sentinels: tuple[str, ...] = ()  # "host:port" of Redis Sentinels; the master's address comes from them
    sentinel_master: str = ""  # the master's name the sentinels monitor
    redis_prefix: str = "flagproxy"
    environment: str = "default"
    snapshot_path: str = ""
    resync_interval_s: float = 30.0
    redis_timeout_s: float = 2.0
    reconnect_max_s: float = 0.5
    audit_max: int = 1000
    sources: tuple[str, ...] = ("split", "native")  # enabled sources; a later one wins a shared flag key

    @property
    def uses_redis(self) -> bool:
        """Redis holds the flags (with Sentinel, ``redis_url`` may be left out)."""
        return bool(self.redis_url or self.sentinels)


@dataclass(frozen=True)
class WebhooksSettings:
    secret: str = ""
    max_body_bytes: int = 1_048_576
    legacy_signatures: bool = False  # also accept the body-only ``sha256=<hex>`` form (replayable)


@dataclass(frozen=True)
class AdminSettings:
    token: str = ""


@dataclass(frozen=True)
class ConsoleSettings:
    """``[console]``: the web console at ``<prefix>/console/`` (docs/console.md); on with an admin token."""

    session_secret: str = ""  # signs the session cookie ("" = derived from [admin] token)
    session_ttl_s: int = 28800  # a sign-in lasts this long (then the token is asked for again)


@dataclass(frozen=True)
class AlertSettings:
    slack_webhook_url: str = ""
    cooldown_s: float = 600.0
    queue_size: int = 100
    timeout_s: float = 5.0
    max_per_second: float = 1.0
    # where change notices go (docs/lifecycle.md): a Slack incoming-webhook URL, or
    # "telegram:<chat id>" when a Telegram notifier is registered; "" = off (the INFO log line stays)
    change_channel: str = ""


@dataclass(frozen=True)
class LifecycleSettings:
    """Flag lifecycle (docs/lifecycle.md): expected lifetimes per type in days (0 = never stale by age)."""

    release_days: float = 40.0
    experiment_days: float = 40.0
    operational_days: float = 7.0
    kill_switch_days: float = 0.0
    permission_days: float = 0.0
    default_type: str = ""  # the type of flags that declare none ("" = no lifetime)
    stale_after_days: float = 7.0  # unused, or one outcome for everyone without a change, this long
    digest_hour: int = -1  # UTC hour of the daily stale digest (-1 = off)
    digest_channel: str = ""  # where the digest goes ("" = [alerts] slack_webhook_url)
    flush_interval_s: float = 60.0  # how often usage counters go to the store

    def lifetimes(self) -> dict[str, float]:
        return {
            "release": self.release_days,
            "experiment": self.experiment_days,
            "operational": self.operational_days,
            "kill-switch": self.kill_switch_days,
            "permission": self.permission_days,
        }


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    token: str = ""


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "json"
    access_log: bool = False


@dataclass(frozen=True)
class ExperimentsSettings:
    enabled: bool = True  # record exposures and conversions of experiment flags
    backend: str = "auto"  # "auto" (Redis when [store] redis_url is set, else SQLite), "sqlite", "redis"
    path: str = ".flagproxy/experiments.sqlite3"  # the SQLite file (its directory is created)
    track_token: str = ""  # Bearer token of POST /api/track (the admin token is accepted too)
    queue_size: int = 100_000  # records waiting to be written, per worker; beyond it dropped and counted
    batch_size: int = 1000  # records per write
    flush_interval_s: float = 0.2  # longest a record waits before it is written
    dedupe_size: int = 100_000  # (experiment, unit, variant) pairs remembered to skip repeats, per worker
    max_events: int = 1000  # events in one POST /api/track


@dataclass(frozen=True)
class SlackChatSettings:
    """``[chat.slack]``: the ``/flag`` slash command (docs/chatops.md)."""

    signing_secret: str = ""  # the Slack app's signing secret ("" = POST /chat/slack answers 404)
    allowed_users: tuple[str, ...] = ()  # Slack user ids that may change flags (empty = nobody)
    allowed_channels: tuple[str, ...] = ()  # when set, changes only from these channel ids
    announce_webhook_url: str = ""  # an incoming webhook: every change is announced there
    reply_within_s: float = 2.0  # answer inline if done by then, else acknowledge and use response_url


@dataclass(frozen=True)
class TelegramChatSettings:
    """``[chat.telegram]``: the ``/flag`` bot command over the Bot API webhook (docs/chatops.md)."""

    secret_token: str = ""  # setWebhook's secret_token ("" = POST /chat/telegram answers 404)
    bot_token: str = ""  # replies and announcements go through the Bot API with it
    bot_username: str = ""  # "/flag@<this>" is for us ("" = any @suffix is accepted)
    api_url: str = "https://api.telegram.org"
    allowed_users: tuple[str, ...] = ()  # Telegram user ids that may change flags (empty = nobody)
    announce_chat_id: str = ""  # every change is announced in this chat ("" = not announced)
    dedupe_size: int = 10000  # update_ids remembered, per worker, to apply a retried update once


@dataclass(frozen=True)
class ChatSettings:
    timeout_s: float = 5.0  # each post to Slack or Telegram (replies, announcements)
    max_pending: int = 100  # posts waiting to be sent; beyond it dropped and logged
    slack: SlackChatSettings = field(default_factory=SlackChatSettings)
    telegram: TelegramChatSettings = field(default_factory=TelegramChatSettings)


@dataclass(frozen=True)
class ClientAPISettings:
    """``[client_api]``: the client flags API (OFREP, the compact endpoint, live updates; docs/clients.md)."""

    rate_limit_per_s: float = 0.0  # requests per second per client key (a token bucket); 0 = no limit
    rate_limit_burst: int = 0  # the bucket's size; 0 = one second's worth (at least 1)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call ("https://app.example"), or "*"
    max_age_s: int = 30  # Cache-Control max-age of the compact endpoint
    max_payload_bytes: int = 2048  # a compact response above this is still sent, logged once and counted
    max_body_bytes: int = 65536  # an OFREP request body above this is refused (413)
    max_streams: int = 1000  # live-update (SSE) connections per worker; beyond it 503
    heartbeat_s: float = 15.0  # a comment line on every idle stream this often
    stream_token_ttl_s: int = 3600  # how long the stream token advertised in bulk responses is good for
    public_url: str = (
        ""  # "https://flags.example.com": the origin advertised for the stream ("" = the request's Host)
    )


@dataclass(frozen=True)
class ClientKeySettings:
    """A ``[[client_keys]]`` table: a key that may read flags through the client flags API."""

    name: str = ""  # for logs and metrics (default "key-<n>"); never the secret
    key: str = ""
    key_env: str = ""  # the environment variable holding the key (instead of ``key``)
    flags: tuple[str, ...] = ("*",)  # globs of the flag keys this key may see


@dataclass(frozen=True)
class GoalSettings:
    """A ``[[goals]]`` table: proxied requests that count as reaching the goal ``name``."""

    name: str
    path: str  # a glob, as flag routes
    method: str = ""  # any method when empty
    status: str = "2xx"  # "2xx", "201", "2xx,3xx": classes and exact codes


@dataclass(frozen=True)
class OriginSettings:
    url: str
    prefix: str = "/"
    strip_prefix: bool = False
    rewrite_host: bool | None = None
    connect_timeout_s: float | None = None
    read_timeout_s: float | None = None
    stream_idle_timeout_s: float | None = None
    total_timeout_s: float | None = None
    body_idle_timeout_s: float | None = None
    send_idle_timeout_s: float | None = None
    pool_limit: int | None = None
    header_limit_bytes: int | None = None
    header_reserve_bytes: int | None = None


ROUTE_TIMEOUTS = (
    "read_timeout_s",
    "stream_idle_timeout_s",
    "total_timeout_s",
    "body_idle_timeout_s",
    "send_idle_timeout_s",
)


@dataclass(frozen=True)
class RouteSettings:
    """A ``[[routes]]`` table: timeouts for the paths matching ``path`` (a glob, as flag routes)."""

    path: str
    read_timeout_s: float | None = None
    stream_idle_timeout_s: float | None = None
    total_timeout_s: float | None = None
    body_idle_timeout_s: float | None = None
    send_idle_timeout_s: float | None = None


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    header: HeaderSettings = field(default_factory=HeaderSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    webhooks: WebhooksSettings = field(default_factory=WebhooksSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    experiments: ExperimentsSettings = field(default_factory=ExperimentsSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    client_api: ClientAPISettings = field(default_factory=ClientAPISettings)
    origins: tuple[OriginSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    goals: tuple[GoalSettings, ...] = ()
    client_keys: tuple[ClientKeySettings, ...] = ()
    # [name] sections the flag sources own; Settings() alone gets each source's defaults
    sources: Mapping[str, Any] = field(default_factory=lambda: {n: t() for n, t in source_sections().items()})

    def section(self, name: str) -> Any:
        """A source's own settings section (None when it has none)."""
        return self.sources.get(name)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in dataclasses.fields(Settings)
    if f.name not in ("origins", "routes", "goals", "client_keys", "sources")
}


def source_sections() -> dict[str, type]:
    """The settings sections the registered flag sources own (``Source.settings_type``)."""
    from proxy.sources.registry import DEFAULT  # config learns the plug-ins' sections from the registry

    return DEFAULT.settings_sections()


def all_sections() -> dict[str, type]:
    """Every ``[section]``: the proxy's own and the flag sources'."""
    return {**SECTIONS, **source_sections()}


# --- value coercion -------------------------------------------------------------------------------


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``X | None`` to ``X``; report whether None is allowed."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(where: str, tp: Any, value: Any, from_text: bool) -> Any:
    base, optional = _base_type(tp)
    if value is None and optional:
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(base) is tuple:
        if from_text and isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    raise AssertionError(f"unsupported setting type {tp!r}")  # pragma: no cover


def _apply(
    where_prefix: str, instance: Any, values: Mapping[str, Any], from_text: bool, source: str = ""
) -> Any:
    """Return ``instance`` with ``values`` applied; ``source`` says where they came from, for errors."""
    hints = typing.get_type_hints(type(instance))
    known = {f.name for f in dataclasses.fields(instance)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{where_prefix} {key}"
        if source:
            where += f" ({source.format(key=key.upper())})"
        if key not in known:
            raise ConfigError(f"{where}: unknown setting")
        if dataclasses.is_dataclass(hints[key]):  # a nested section: [chat.slack]
            table = f"[{where_prefix.strip('[]')}.{key}]"
            if not isinstance(value, Mapping):
                raise ConfigError(f"{table}: expected a table")
            nested = source.replace("{key}", f"{key.upper()}_{{key}}")
            changes[key] = _apply(table, getattr(instance, key), value, from_text, nested)
            continue
        changes[key] = _coerce(where, hints[key], value, from_text)
    return dataclasses.replace(instance, **changes)


def _env_values(var_prefix: str, section: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """``FLAGPROXY_<SECTION>_<KEY>`` values for ``section``; a nested section's keys are
    ``FLAGPROXY_<SECTION>_<NESTED>_<KEY>`` (``FLAGPROXY_CHAT_SLACK_SIGNING_SECRET``)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        var = f"{var_prefix}_{f.name.upper()}"
        if dataclasses.is_dataclass(value):
            nested = _env_values(var, value, env)
            if nested:
                values[f.name] = nested
        elif var in env:
            values[f.name] = env[var]
    return values


def setting_names(kind: type, prefix: str = "") -> list[str]:
    """Every setting of a section, nested ones dotted (``slack.signing_secret``)."""
    hints = typing.get_type_hints(kind)
    names: list[str] = []
    for f in dataclasses.fields(kind):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            names += setting_names(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            names.append(prefix + f.name)
    return names


# --- origins --------------------------------------------------------------------------------------


def parse_origin_spec(spec: str) -> OriginSettings:
    """``[PREFIX=]URL`` as given to ``--origin`` / ``FLAGPROXY_ORIGINS``."""
    spec = spec.strip()
    prefix, sep, url = spec.partition("=")
    if not sep or not prefix.startswith("/"):
        prefix, url = "/", spec
    return OriginSettings(url=url.strip(), prefix=prefix.strip())


def _origin_from_table(index: int, table: Any) -> OriginSettings:
    where = f"[[origins]] #{index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    if "url" not in table:
        raise ConfigError(f"{where} url: missing")
    origin: OriginSettings = _apply(where, OriginSettings(url=""), table, from_text=False)
    return origin


def _route_from_table(index: int, table: Any) -> RouteSettings:
    where = f"[[routes]] #{index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    path = table.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{where} path: a glob starting with '/' is required, got {path!r}")
    route: RouteSettings = _apply(where, RouteSettings(path=""), table, from_text=False)
    return route


def _goal_from_table(index: int, table: Any) -> GoalSettings:
    where = f"[[goals]] #{index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for name in ("name", "path"):
        if name not in table:
            raise ConfigError(f"{where} {name}: missing")
    goal: GoalSettings = _apply(where, GoalSettings(name="", path=""), table, from_text=False)
    return goal


def _client_key_from_table(index: int, table: Any, env: Mapping[str, str]) -> ClientKeySettings:
    """A ``[[client_keys]]`` table, its secret read from ``key_env`` when that is given."""
    where = f"[[client_keys]] #{index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    entry: ClientKeySettings = _apply(where, ClientKeySettings(), table, from_text=False)
    if entry.key and entry.key_env:
        raise ConfigError(f"{where}: give key or key_env, not both")
    if entry.key_env:
        secret = env.get(entry.key_env, "")
        if not secret:
            raise ConfigError(f"{where} key_env: the environment variable {entry.key_env} is not set")
        entry = dataclasses.replace(entry, key=secret)
    if not entry.key:
        raise ConfigError(f"{where} key: missing (give key or key_env)")
    return dataclasses.replace(entry, name=entry.name or f"key-{index + 1}")


# --- loading --------------------------------------------------------------------------------------


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {os.fspath(path)}: invalid TOML: {exc}") from None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    origins: list[str] | None = None,
    plugins: Mapping[str, type] | None = None,
) -> Settings:
    """Build validated settings from the four layers; raise ConfigError naming the bad field.

    ``plugins``: the flag sources' own sections (default: every registered source's).
    """
    env = os.environ if env is None else env
    plugins = source_sections() if plugins is None else plugins
    settings = Settings()
    file_data = load_file(config_file) if config_file else {}

    sections = {name: getattr(settings, name) for name in SECTIONS}
    sections.update({name: kind() for name, kind in plugins.items()})
    for name, value in file_data.items():
        if name in ("origins", "routes", "goals", "client_keys"):
            continue
        if name not in sections:
            raise ConfigError(f"[{name}]: unknown section")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}]: expected a table")
        sections[name] = _apply(f"[{name}]", sections[name], value, from_text=False)

    for name, section in sections.items():
        env_values = _env_values(f"{ENV_PREFIX}{name.upper()}", section, env)
        if env_values:
            source = f"from {ENV_PREFIX}{name.upper()}_{{key}}"
            sections[name] = _apply(f"[{name}]", section, env_values, from_text=True, source=source)

    for name, values in (overrides or {}).items():
        present = {k: v for k, v in values.items() if v is not None}
        if present:
            sections[name] = _apply(
                f"[{name}]", sections[name], present, from_text=False, source="from the command line"
            )

    origin_list: tuple[OriginSettings, ...] = ()
    raw_origins = file_data.get("origins")
    if raw_origins is not None:
        if not isinstance(raw_origins, list):
            raise ConfigError("[[origins]]: expected an array of tables")
        origin_list = tuple(_origin_from_table(i, t) for i, t in enumerate(raw_origins))
    if env.get(f"{ENV_PREFIX}ORIGINS"):
        specs = env[f"{ENV_PREFIX}ORIGINS"].split(",")
        origin_list = tuple(parse_origin_spec(s) for s in specs if s.strip())
    if origins:
        origin_list = tuple(parse_origin_spec(s) for s in origins)

    raw_routes = file_data.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError("[[routes]]: expected an array of tables")
    route_list = tuple(_route_from_table(i, t) for i, t in enumerate(raw_routes))
    raw_goals = file_data.get("goals", [])
    if not isinstance(raw_goals, list):
        raise ConfigError("[[goals]]: expected an array of tables")
    goal_list = tuple(_goal_from_table(i, t) for i, t in enumerate(raw_goals))
    raw_keys = file_data.get("client_keys", [])
    if not isinstance(raw_keys, list):
        raise ConfigError("[[client_keys]]: expected an array of tables")
    key_list = tuple(_client_key_from_table(i, t, env) for i, t in enumerate(raw_keys))

    store = sections["store"]
    replaced = (
        bool(env.get(f"{ENV_PREFIX}STORE_FLAGS_FILE"))
        or (overrides or {}).get("store", {}).get("flags_file") is not None
    )
    store_table = file_data.get("store")
    written = isinstance(store_table, dict) and "flags_file" in store_table
    layer = "command line or environment" if replaced else "file" if written else "default"
    located = _locate_flags_file(store.flags_file, layer, config_file)
    sections["store"] = dataclasses.replace(store, flags_file=located)
    core = {name: section for name, section in sections.items() if name in SECTIONS}
    own = {name: section for name, section in sections.items() if name not in SECTIONS}
    settings = Settings(
        **core, origins=origin_list, routes=route_list, goals=goal_list, client_keys=key_list, sources=own
    )
    validate(settings)
    for section in own.values():
        check = getattr(section, "validate", None)
        if check is not None:
            check()
    return settings


def default_flags_candidates() -> list[Path]:
    """Where the default flags file is looked for: the working directory, then the checkout the
    package runs from (so ``flagproxy serve`` started elsewhere still finds the seeds)."""
    here = Path.cwd() / DEFAULT_FLAGS_FILE
    checkout = Path(__file__).resolve().parent.parent / DEFAULT_FLAGS_FILE
    return [here] if checkout == here.resolve() else [here, checkout]


def _locate_flags_file(value: str, layer: str, config_file: str | os.PathLike[str] | None) -> str:
    """The flags file as the proxy will open it.

    ``layer`` says who set it. A relative path written in the TOML file is relative to that file
    (``config/demo.toml`` says ``../seeds/flags.json``); one from the environment or the command
    line is relative to the working directory. The default (nobody set it) is the first of
    ``default_flags_candidates()`` that exists; when none does it stays as it is (no flags, which
    ``serve`` refuses without ``--allow-empty``).
    """
    if layer == "default":
        found = [p for p in default_flags_candidates() if p.exists()]
        return str(found[0]) if found else value
    path = Path(value)
    if layer != "file" or config_file is None or path.is_absolute():
        return value
    directory = Path(config_file).resolve().parent
    beside = directory / path
    if not beside.exists() and path.exists():  # written before paths were relative to the file
        logging.getLogger("flagproxy").warning(
            "[store] flags_file %r: read from the working directory; paths in %s are now relative "
            "to it (write %r)",
            value,
            config_file,
            os.path.relpath(path.resolve(), directory),
        )
        return value
    return os.path.normpath(beside)  # no ".." left; symlinks kept (a ConfigMap's must stay watched)


# --- validation -----------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_header_name(where: str, value: str) -> None:
    _check(bool(_TOKEN.match(value)), f"{where}: {value!r} is not a valid header name")


def validate(settings: Settings) -> None:
    s = settings.server
    _check(1 <= s.port <= 65535, f"[server] port: must be 1..65535, got {s.port}")
    _check(
        s.control_prefix.startswith("/") and s.control_prefix != "/" and not s.control_prefix.endswith("/"),
        f"[server] control_prefix: must start with '/' and not end with '/', got {s.control_prefix!r}",
    )
    _check(s.max_request_head_bytes > 0, "[server] max_request_head_bytes: must be positive")
    _check(s.shutdown_grace_s >= 0, "[server] shutdown_grace_s: must not be negative")
    for name in ("header_timeout_s", "keepalive_timeout_s"):
        _check(getattr(s, name) > 0, f"[server] {name}: must be positive, got {getattr(s, name)}")
    for name in ("body_idle_timeout_s", "send_idle_timeout_s"):
        _check(getattr(s, name) >= 0, f"[server] {name}: must not be negative (0 = none)")
    _check(
        s.control_port == 0 or (1 <= s.control_port <= 65535 and s.control_port != s.port),
        f"[server] control_port: 0 (off) or a port other than [server] port, got {s.control_port}",
    )
    _check(s.max_connections > 0, f"[server] max_connections: must be positive, got {s.max_connections}")

    u = settings.upstream
    for name in ("connect_timeout_s", "read_timeout_s", "pool_timeout_s", "keepalive_timeout_s"):
        _check(getattr(u, name) > 0, f"[upstream] {name}: must be positive, got {getattr(u, name)}")
    _check(u.pool_limit > 0, f"[upstream] pool_limit: must be positive, got {u.pool_limit}")
    for name in ("stream_idle_timeout_s", "total_timeout_s"):
        _check(getattr(u, name) >= 0, f"[upstream] {name}: must not be negative (0 = none)")
    _check(
        u.max_response_head_bytes >= 1024,
        f"[upstream] max_response_head_bytes: must be at least 1024, got {u.max_response_head_bytes}",
    )
    for i, origin in enumerate(settings.origins):
        for name in ("connect_timeout_s", "read_timeout_s", *ROUTE_TIMEOUTS):
            value = getattr(origin, name, None)
            _check(value is None or value >= 0, f"[[origins]] #{i + 1} {name}: must not be negative")
    for i, route in enumerate(settings.routes):
        for name in ROUTE_TIMEOUTS:
            value = getattr(route, name)
            _check(value is None or value >= 0, f"[[routes]] #{i + 1} {name}: must not be negative")

    for cidr in settings.proxy.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"[proxy] trusted_proxies: {cidr!r} is not an IP network (CIDR)") from None
    underscores = settings.proxy.underscore_headers
    _check(
        underscores in ("drop", "reject", "pass"),
        f"[proxy] underscore_headers: expected drop, reject or pass, got {underscores!r}",
    )
    _check("\r" not in settings.proxy.via and "\n" not in settings.proxy.via, "[proxy] via: no line breaks")

    h = settings.header
    check_header_name("[header] name", h.name)
    if h.config_name:
        check_header_name("[header] config_name", h.config_name)
        _check(
            h.config_name.lower().startswith(h.name.lower() + "-"),
            f"[header] config_name: must start with {h.name + '-'!r} (every flag header name derives from "
            f"[header] name), got {h.config_name!r}; leave it empty for {h.name + '-Config'!r}",
        )
    _check(h.limit_bytes > 0, f"[header] limit_bytes: must be positive, got {h.limit_bytes}")
    _check(h.reserve_bytes >= 0, f"[header] reserve_bytes: must not be negative, got {h.reserve_bytes}")
    _check(
        h.reserve_bytes < h.limit_bytes,
        f"[header] reserve_bytes: must be below limit_bytes ({h.limit_bytes}), got {h.reserve_bytes}",
    )
    _check(0 < h.alert_ratio <= 1, f"[header] alert_ratio: must be in (0, 1], got {h.alert_ratio}")
    c = settings.context
    if c.key_header:
        check_header_name("[context] key_header", c.key_header)
    check_header_name("[context] telegram_header", c.telegram_header)
    _check(c.telegram_max_age_s >= 0, "[context] telegram_max_age_s: must not be negative")
    _check(c.anonymous_max_age_s > 0, "[context] anonymous_max_age_s: must be positive")
    _check(
        not c.anonymous_cookie or bool(_TOKEN.match(c.anonymous_cookie)),
        f"[context] anonymous_cookie: {c.anonymous_cookie!r} is not a valid cookie name",
    )
    _check(
        not c.cookie_secret or len(c.cookie_secret) >= 16,
        "[context] cookie_secret: use at least 16 characters (a random 32-byte hex string is best)",
    )
    _check(
        not settings.console.session_secret or len(settings.console.session_secret) >= 16,
        "[console] session_secret: use at least 16 characters (a random 32-byte hex string is best)",
    )
    _check(settings.console.session_ttl_s >= 60, "[console] session_ttl_s: at least 60 seconds")
    _check(
        c.identity_cache_bytes >= 0,
        f"[context] identity_cache_bytes: must not be negative (0 = no cache), got {c.identity_cache_bytes}",
    )
    _check(
        not (c.jwt_secret and c.jwt_public_key),
        "[context] jwt_secret and jwt_public_key: configure one (HS256 secret or RS256 public key), not both",
    )

    st = settings.store
    _validate_redis(st)
    _check(
        "native" in st.sources,
        f"[store] sources: must include 'native' (the flags file and the admin API write it), "
        f"got {list(st.sources)}",
    )
    for name in ("resync_interval_s", "redis_timeout_s", "reconnect_max_s"):
        _check(getattr(st, name) > 0, f"[store] {name}: must be positive, got {getattr(st, name)}")
    _check(st.audit_max > 0, f"[store] audit_max: must be positive, got {st.audit_max}")
    for name in ("redis_prefix", "environment"):
        value = getattr(st, name)
        _check(
            bool(value) and not any(c.isspace() for c in value), f"[store] {name}: must be a non-empty word"
        )
    _check(settings.webhooks.max_body_bytes > 0, "[webhooks] max_body_bytes: must be positive")

    al = settings.alerts
    _check(al.cooldown_s >= 0, "[alerts] cooldown_s: must not be negative")
    _check(al.queue_size > 0, "[alerts] queue_size: must be positive")
    _check(al.timeout_s > 0, "[alerts] timeout_s: must be positive")
    _check(al.max_per_second > 0, "[alerts] max_per_second: must be positive")
    if al.slack_webhook_url:
        scheme = urlsplit(al.slack_webhook_url).scheme
        _check(scheme in ("http", "https"), "[alerts] slack_webhook_url: must be an http(s) URL")
    for name, channel in (
        ("[alerts] change_channel", al.change_channel),
        ("[lifecycle] digest_channel", settings.lifecycle.digest_channel),
    ):
        if channel and not channel.startswith("telegram:"):
            scheme = urlsplit(channel).scheme
            _check(
                scheme in ("http", "https"),
                f"{name}: must be a Slack incoming-webhook URL or telegram:<chat id>",
            )
    lc = settings.lifecycle
    for name, days in lc.lifetimes().items():
        _check(days >= 0, f"[lifecycle] {name.replace('-', '_')}_days: must not be negative")
    _check(
        lc.default_type in ("", *lc.lifetimes()),
        f"[lifecycle] default_type: expected one of {', '.join(lc.lifetimes())} or an empty string, "
        f"got {lc.default_type!r}",
    )
    _check(lc.stale_after_days > 0, "[lifecycle] stale_after_days: must be positive")
    _check(-1 <= lc.digest_hour <= 23, "[lifecycle] digest_hour: expected 0..23, or -1 (off)")
    _check(lc.flush_interval_s > 0, "[lifecycle] flush_interval_s: must be positive")
    _check(h.typical_request_bytes >= 0, "[header] typical_request_bytes: must not be negative")

    lg = settings.log
    _check(
        lg.level.lower() in LOG_LEVELS,
        f"[log] level: expected one of {', '.join(LOG_LEVELS)}, got {lg.level!r}",
    )
    _check(lg.format.lower() in LOG_FORMATS, f"[log] format: expected json or text, got {lg.format!r}")

    _validate_experiments(settings)
    _validate_chat(settings.chat)
    _validate_client_api(settings)

    seen: set[str] = set()
    for i, origin in enumerate(settings.origins):
        where = f"origin #{i + 1} ({origin.prefix}={origin.url})"
        parts = urlsplit(origin.url)
        _check(parts.scheme in ("http", "https"), f"{where}: url must start with http:// or https://")
        _check(bool(parts.hostname), f"{where}: url has no host")
        _check(not parts.query and not parts.fragment, f"{where}: url must not have a query or fragment")
        _check(origin.prefix.startswith("/"), f"{where}: prefix must start with '/'")
        segments = origin.prefix.split("/")
        _check(
            origin.prefix.isascii()
            and not any(c in origin.prefix for c in "%\\;#?")
            and "." not in segments
            and ".." not in segments
            and "" not in segments[1:-1],
            f"{where}: prefix must be a plain ASCII path (no %-escapes, '\\', ';', '#', '?', dot segments or "
            f"'//'): routing compares it with the decoded, normalised path",
        )
        _check(origin.prefix not in seen, f"{where}: prefix {origin.prefix!r} is configured twice")
        seen.add(origin.prefix)
        norm = origin.prefix.rstrip("/") or "/"
        ctl = settings.server.control_prefix
        _check(
            not (norm == ctl or norm.startswith(ctl + "/")),
            f"{where}: prefix is inside the reserved control prefix {ctl!r}",
        )
        for name in ("connect_timeout_s", "read_timeout_s", "pool_limit", "header_limit_bytes"):
            value = getattr(origin, name)
            _check(value is None or value > 0, f"{where} {name}: must be positive")
        limit = origin.header_limit_bytes or h.limit_bytes
        reserve = h.reserve_bytes if origin.header_reserve_bytes is None else origin.header_reserve_bytes
        _check(0 <= reserve < limit, f"{where} header_reserve_bytes: must be in [0, {limit})")


def _validate_redis(st: StoreSettings) -> None:
    """One of: a server (``redis_url``), Sentinel (``sentinels`` + ``sentinel_master``), a Cluster."""
    scheme = urlsplit(st.redis_url).scheme if st.redis_url else ""
    if st.redis_url:
        _check(
            scheme in ("redis", "rediss", "unix"),
            f"[store] redis_url: expected redis://, rediss:// or unix://, got {st.redis_url!r}",
        )
    _check(
        not (st.sentinels and st.redis_cluster),
        "[store] sentinels and redis_cluster: Sentinel or Cluster, not both",
    )
    _check(
        bool(st.sentinels) == bool(st.sentinel_master),
        "[store] sentinel_master: set it together with [store] sentinels (the name the sentinels monitor)"
        if st.sentinels
        else "[store] sentinels: sentinel_master is set, but no sentinels (host:port) to ask for it",
    )
    for entry in st.sentinels:
        host, _, port = entry.rpartition(":")
        _check(
            bool(host) and port.isdigit() and 1 <= int(port) <= 65535,
            f"[store] sentinels: expected host:port entries, got {entry!r}",
        )
    _check(
        not (st.sentinels and scheme == "unix"),
        "[store] redis_url: with sentinels it gives only the scheme, credentials and options: redis:// or "
        "rediss://, not unix://",
    )
    if st.redis_cluster:
        _check(
            scheme in ("redis", "rediss"),
            "[store] redis_cluster: needs [store] redis_url (--redis-url) naming any node, "
            "redis:// or rediss://",
        )
        db = urlsplit(st.redis_url).path.strip("/")
        _check(
            db in ("", "0"),
            f"[store] redis_url: a Redis Cluster has only database 0, got /{db} (redis_cluster = true)",
        )


def _validate_experiments(settings: Settings) -> None:
    e = settings.experiments
    _check(
        e.backend in EXPERIMENT_BACKENDS,
        f"[experiments] backend: expected one of {', '.join(EXPERIMENT_BACKENDS)}, got {e.backend!r}",
    )
    _check(
        e.backend != "redis" or settings.store.uses_redis,
        '[experiments] backend: "redis" needs [store] redis_url (or sentinels)',
    )
    _check(bool(e.path.strip()), "[experiments] path: must not be empty")
    for name in ("queue_size", "batch_size", "dedupe_size", "max_events"):
        _check(getattr(e, name) > 0, f"[experiments] {name}: must be positive, got {getattr(e, name)}")
    _check(
        e.flush_interval_s > 0, f"[experiments] flush_interval_s: must be positive, got {e.flush_interval_s}"
    )
    for i, goal in enumerate(settings.goals):
        where = f"[[goals]] #{i + 1} ({goal.name!r})"
        _check(
            0 < len(goal.name) <= 128 and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in goal.name),
            f"{where} name: 1..128 characters, no control characters",
        )
        _check(
            goal.path.startswith("/"),
            f"{where} path: a glob starting with '/' is required, got {goal.path!r}",
        )
        _check(
            not goal.method or bool(_TOKEN.match(goal.method)),
            f"{where} method: {goal.method!r} is not an HTTP method",
        )
        try:
            status_matcher(goal.status)
        except ValueError as exc:
            raise ConfigError(f"{where} status: {exc}") from None


_TELEGRAM_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


_ORIGIN = re.compile(r"https?://[^/?#\s]+")


def _validate_client_api(settings: Settings) -> None:
    c = settings.client_api
    _check(
        c.rate_limit_per_s >= 0,
        f"[client_api] rate_limit_per_s: must not be negative, got {c.rate_limit_per_s}",
    )
    _check(
        c.rate_limit_burst >= 0,
        f"[client_api] rate_limit_burst: must not be negative, got {c.rate_limit_burst}",
    )
    for name in ("max_age_s", "max_payload_bytes"):
        _check(getattr(c, name) >= 0, f"[client_api] {name}: must not be negative, got {getattr(c, name)}")
    for name in ("max_body_bytes", "max_streams", "heartbeat_s", "stream_token_ttl_s"):
        _check(getattr(c, name) > 0, f"[client_api] {name}: must be positive, got {getattr(c, name)}")
    for origin in c.cors_origins:
        _check(
            origin == "*" or bool(_ORIGIN.fullmatch(origin)),
            f"[client_api] cors_origins: {origin!r} is not an origin (scheme://host[:port], no path) or '*'",
        )
    _check(
        not c.public_url or bool(_ORIGIN.fullmatch(c.public_url)),
        f"[client_api] public_url: {c.public_url!r} is not an origin (scheme://host[:port], no path)",
    )
    names: set[str] = set()
    secrets: set[str] = set()
    for i, entry in enumerate(settings.client_keys):
        where = f"[[client_keys]] #{i + 1}"
        _check(entry.name not in names, f"{where} name: {entry.name!r} is used twice")
        _check(entry.key not in secrets, f"{where} key: the same key is configured twice")
        _check(
            0 < len(entry.name) <= 64 and all(ch.isalnum() or ch in "-_." for ch in entry.name),
            f"{where} name: 1..64 characters of letters, digits, '-', '_' and '.', got {entry.name!r}",
        )
        _check(
            len(entry.key) >= 16 and entry.key.isprintable() and entry.key.isascii() and " " not in entry.key,
            f"{where} key: at least 16 printable ASCII characters without spaces",
        )
        _check(bool(entry.flags), f'{where} flags: at least one glob ("*" for every flag)')
        names.add(entry.name)
        secrets.add(entry.key)


def _validate_chat(chat: ChatSettings) -> None:
    _check(chat.timeout_s > 0, f"[chat] timeout_s: must be positive, got {chat.timeout_s}")
    _check(chat.max_pending > 0, f"[chat] max_pending: must be positive, got {chat.max_pending}")
    sl, tg = chat.slack, chat.telegram
    _check(
        0 <= sl.reply_within_s <= 2.5,
        f"[chat.slack] reply_within_s: 0..2.5 (Slack waits 3 s for the answer), got {sl.reply_within_s}",
    )
    for where, url in (
        ("[chat.slack] announce_webhook_url", sl.announce_webhook_url),
        ("[chat.telegram] api_url", tg.api_url),
    ):
        _check(not url or urlsplit(url).scheme in ("http", "https"), f"{where}: must be an http(s) URL")
    _check(
        not tg.secret_token or bool(_TELEGRAM_SECRET.fullmatch(tg.secret_token)),
        "[chat.telegram] secret_token: 1..256 characters of A-Z, a-z, 0-9, _ and - (the Bot API's rule)",
    )
    _check(
        not tg.secret_token or bool(tg.bot_token),
        "[chat.telegram] bot_token: required with secret_token (replies go through the Bot API)",
    )
    _check(tg.dedupe_size > 0, f"[chat.telegram] dedupe_size: must be positive, got {tg.dedupe_size}")


def status_matcher(spec: str) -> tuple[frozenset[int], frozenset[int]]:
    """``"2xx,3xx"``, ``"201"`` → (status classes, exact codes); ValueError naming a bad part."""
    classes: set[int] = set()
    codes: set[int] = set()
    for part in (p.strip().lower() for p in spec.split(",")):
        if len(part) == 3 and part[0] in "12345" and part[1:] == "xx":
            classes.add(int(part[0]))
        elif len(part) == 3 and part.isdigit() and 100 <= int(part) <= 599:
            codes.add(int(part))
        else:
            raise ValueError(f"{part!r} is not a status (201) or class (2xx) in {spec!r}")
    return frozenset(classes), frozenset(codes)


def header_budget(settings: Settings, origin: OriginSettings | None = None) -> int:
    """Bytes the request line and headers may take at the origin: limit - reserve (per origin if set)."""
    h = settings.header
    limit = (origin.header_limit_bytes if origin else None) or h.limit_bytes
    reserve = origin.header_reserve_bytes if origin and origin.header_reserve_bytes is not None else None
    return limit - (h.reserve_bytes if reserve is None else reserve)


def flag_header_names(settings: Settings) -> FlagHeaderNames:
    """Every flag header name, derived from ``[header] name`` (and ``config_name`` when set)."""
    return FlagHeaderNames(settings.header.name, settings.header.config_name)
