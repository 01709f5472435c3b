"""uvicorn integration: how the proxy is served (protocol, workers)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from proxy.config import DEFAULT_FLAGS_FILE, ConfigError, Settings, default_flags_candidates, load_settings
from proxy.dataplane.client_side import ClientConnection
from proxy.logs import logging_config

log = logging.getLogger("flagproxy")
INPUTS_ENV = "FLAGPROXY__SERVE_INPUTS"  # how worker processes get the parent's settings inputs


def settings_from_inputs(inputs: dict[str, Any]) -> Settings:
    settings = load_settings(
        config_file=inputs.get("config"), overrides=inputs.get("overrides"), origins=inputs.get("origins")
    )
    if not settings.origins:
        raise ConfigError("origins: at least one origin is required (--origin [PREFIX=]URL or [[origins]])")
    return settings


def app_from_environment() -> Any:
    """The app factory each worker process calls (``--workers N``)."""
    return build_app(settings_from_inputs(json.loads(os.environ[INPUTS_ENV])))


def build_app(settings: Settings) -> Any:
    """The app; ``ClientConnection`` finds it through uvicorn's config and serves its requests."""
    from proxy.app import FlagProxy

    app = FlagProxy(settings)  # also validates flags and settings before anything listens
    refuse_empty(settings, app)
    return app


def checked_settings(inputs: dict[str, Any]) -> Settings:
    """The settings read again, with the checks ``serve`` makes before it listens (the flags file
    parses and has flags); ConfigError or OSError naming the problem otherwise."""
    from proxy.sources.native.document import SOURCE, initial_state

    settings = settings_from_inputs(inputs)
    path = settings.store.flags_file
    try:
        state = initial_state(path, required=path != DEFAULT_FLAGS_FILE)
    except ValueError as exc:  # FlagError: the flags file does not validate
        raise ConfigError(f"flags file {path}: {exc}") from None
    if not state.data.get(SOURCE, {}).get("flags") and not (
        settings.store.allow_empty or settings.store.uses_redis
    ):
        raise ConfigError(f"the flags file {path} has no flags ([store] allow_empty to allow it)")
    return settings


def refuse_empty(settings: Settings, app: Any) -> None:
    """No flags and nothing that could bring any: almost always a flags file that was not found
    (a relative path, started from elsewhere). Said loudly instead of serving nothing."""
    if settings.store.allow_empty or settings.store.uses_redis or len(app.store.snapshot.flags):
        return
    if any(sync.enabled for name, sync in app.syncs.items() if name != "native"):
        return  # a vendor sync brings them
    path = settings.store.flags_file
    if path == DEFAULT_FLAGS_FILE:
        looked = ", ".join(str(p) for p in default_flags_candidates())
        where = f"no flags file found (looked for {looked})"
    else:
        where = f"the flags file {os.path.abspath(path)} has no flags"
    raise ConfigError(
        f"no flags to serve: {where}; pass --flags FILE ([store] flags_file), or --allow-empty "
        "([store] allow_empty) to start with none and add them through the admin API or a webhook"
    )


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client (and proxy.metrics)


def run(settings: Settings, inputs: dict[str, Any], workers: int = 1) -> None:
    # Metrics: several workers share a directory of mmap files (prometheus_client's multiprocess
    # mode). prometheus_client reads the variable once, when it is imported, so it is settled here
    # before the app (and prometheus_client) is imported: this supervising process must not write
    # there, its app below only validates the settings and flags.
    shared_dir = os.environ.pop(MULTIPROC_ENV, "") if workers > 1 else os.environ.get(MULTIPROC_ENV, "")
    if shared_dir and workers == 1:
        prepare_metrics_dir(shared_dir)
    app = build_app(settings)
    # SIGHUP with one worker (proxy.reload): the flags file is re-read by its own sync, separately
    app.settings_source = lambda: settings_from_inputs(inputs)
    log_settings = settings.log
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": "uvloop",
        "http": ClientConnection,  # proxied traffic at the protocol level, control plane via ASGI
        "lifespan": "on",
        "access_log": False,  # the proxy writes its own ([log] access_log)
        "server_header": False,
        "date_header": False,
        # X-Forwarded-* trust is the proxy's own decision ([proxy] trusted_proxies), never uvicorn's.
        "proxy_headers": False,
        "log_config": logging_config(log_settings.level, log_settings.format, log_settings.access_log),
        "log_level": log_settings.level.lower(),
        "timeout_graceful_shutdown": settings.server.shutdown_grace_s,
    }
    control_port = settings.server.control_port
    if workers == 1:
        if control_port:
            serve_two_ports({**options, "app": app}, control_port, workers, inputs)
        else:
            uvicorn.run(app, **options)
        return
    if not settings.store.uses_redis:
        log.warning(
            "%d workers on the embedded memory store: a webhook or admin change reaches only the worker "
            "that received it; use --redis-url so every worker shares the flags",
            workers,
        )
    own_dir = not shared_dir
    shared_dir = shared_dir or tempfile.mkdtemp(prefix="flagproxy-metrics-")
    prepare_metrics_dir(shared_dir)
    os.environ[MULTIPROC_ENV] = shared_dir
    os.environ[INPUTS_ENV] = json.dumps(inputs)
    try:
        if control_port:
            serve_two_ports(options, control_port, workers, inputs)
        else:
            config = uvicorn.Config(
                "proxy.server:app_from_environment", factory=True, workers=workers, **options
            )
            ReloadingSupervisor(config, [config.bind_socket()], inputs).run()
    finally:
        if own_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)


def serve_two_ports(options: dict[str, Any], control_port: int, workers: int, inputs: dict[str, Any]) -> None:
    """Traffic on ``[server] port`` and the control plane on ``[server] control_port``: one server
    (or one per worker) listening on both sockets; the connection tells them apart by its local port."""
    if "app" in options:
        config = uvicorn.Config(**options)
    else:
        config = uvicorn.Config("proxy.server:app_from_environment", factory=True, workers=workers, **options)
    control = uvicorn.Config(**{**options, "app": None, "port": control_port})
    sockets = [config.bind_socket(), control.bind_socket()]
    log.info("control plane on %s:%d", config.host, control_port)
    if workers == 1:
        config.load_app()
        uvicorn.Server(config).run(sockets=sockets)
    else:
        ReloadingSupervisor(config, sockets, inputs).run()


def prepare_metrics_dir(path: str) -> None:
    """Empty ``path`` of earlier runs' files, as prometheus_client requires before workers start."""
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


class ReloadingSupervisor(Multiprocess):
    """``--workers N``: SIGHUP checks the new settings first, then replaces the workers one at a time
    (uvicorn brings each new one into service before the old one stops); settings that do not
    validate are logged and the running workers are kept."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any], inputs: dict[str, Any]) -> None:
        super().__init__(config, sockets=sockets)
        self.inputs = inputs
        self.running = settings_from_inputs(inputs)

    def handle_hup(self) -> None:
        from proxy.reload import LISTENER, compare_workers

        try:
            new = checked_settings(self.inputs)
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: reload refused, the workers keep running as they are: %s", exc)
            return
        if not new.store.uses_redis:
            log.error(
                "SIGHUP: reload refused: with --workers on the memory store each worker holds its own "
                "flags, and replacing the workers would lose every change made since they started "
                "(admin API, webhooks, chat); use --redis-url, or restart to start from the flags file"
            )
            return
        report = compare_workers(self.running, new)
        # the sockets are the supervisor's: new workers keep the running listener settings
        pinned = {key: getattr(self.running.server, key) for key in LISTENER}
        overrides = {**self.inputs.get("overrides", {})}
        overrides["server"] = {**overrides.get("server", {}), **pinned}
        os.environ[INPUTS_ENV] = json.dumps({**self.inputs, "overrides": overrides})
        self.running = settings_from_inputs({**self.inputs, "overrides": overrides})
        log.info("SIGHUP: %s; replacing the workers one at a time", report.summary())
        self.restart_all()
