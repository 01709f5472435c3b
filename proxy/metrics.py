"""Prometheus metrics: what the proxy counts, and the exposition ``/__flags/metrics`` serves.

One process: every app has a private registry. Several processes (``serve --workers N``, or an
operator's ``PROMETHEUS_MULTIPROC_DIR``): prometheus_client's multiprocess mode — each process writes
its values to mmap files in that directory and whichever worker answers a scrape merges them
(counters and histograms are summed, also over workers that have exited; gauges take the lowest
value among live workers, so ``flagproxy_store_version`` is the oldest version any worker serves).

Data-path cost: label children are bound once per origin, so a request costs one counter increment
and two histogram observations (≈2 µs in one process, ≈5 µs in multiprocess mode).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped upstream) no *_created series: multiprocess mode has none, so neither does one process

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HEADER_BYTES_BUCKETS = (0, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 10240, 16384)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
SYNC_TIMESTAMP = "flagproxy_last_sync_timestamp_seconds"


def multiprocess_enabled() -> bool:
    """What prometheus_client decided when it was imported (it reads the environment only then)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class OriginMetrics:
    """The label children of one origin, bound once so the data path does no label lookups."""

    __slots__ = (
        "_metrics",
        "by_status",
        "errors",
        "header_bytes",
        "label",
        "latency",
        "near_limit",
        "omitted",
        "over_budget",
        "trims",
    )

    def __init__(self, metrics: Metrics, label: str) -> None:
        self._metrics = metrics
        self.label = label
        requests = metrics.requests
        # index = status // 100; 0 and anything above 5 count as 5xx (never expected)
        children = [requests.labels(label, c) for c in STATUS_CLASSES]
        self.by_status = (children[4], *children, children[4], children[4], children[4], children[4])
        self.latency = metrics.upstream_latency.labels(label)
        self.header_bytes = metrics.flag_header_bytes.labels(label)
        self.trims = metrics.trims.labels(label)
        self.omitted = metrics.omitted.labels(label)
        self.near_limit = metrics.near_limit.labels(label)
        self.over_budget = metrics.over_budget.labels(label)
        self.errors: dict[str, Any] = {}

    def request(self, status: int) -> None:
        index = status // 100
        self.by_status[index if 0 <= index < 10 else 0].inc()

    def budget_event(self, condition: str, omitted: int) -> None:
        """A request that crossed the alert ratio (``near_limit``) or lost ``omitted`` flag entries."""
        if condition == "near_limit":
            self.near_limit.inc()
        elif condition == "over_budget":
            self.over_budget.inc()
        if omitted:
            self.trims.inc()
            self.omitted.inc(omitted)

    def upstream_error(self, reason: str) -> None:
        child = self.errors.get(reason)
        if child is None:
            child = self.errors[reason] = self._metrics.upstream_errors.labels(self.label, reason)
        child.inc()


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_enabled()
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "flagproxy_requests",
            "Proxied requests by origin (route prefix, 'none' when no origin matched) and status class.",
            ["origin", "status_class"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "flagproxy_upstream_latency_seconds",
            "Time from sending a request upstream to the origin's response headers.",
            ["origin"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "flagproxy_upstream_errors",
            "Requests the origin did not answer: reason timeout, connect or other.",
            ["origin", "reason"],
            registry=r,
        )
        self.flag_header_bytes = Histogram(
            "flagproxy_flag_header_bytes",
            "Bytes of flag header lines (values, configs, omitted count, signature) added to a request.",
            ["origin"],
            buckets=HEADER_BYTES_BUCKETS,
            registry=r,
        )
        self.trims = Counter(
            "flagproxy_flag_trims",
            "Requests whose flag headers were trimmed to fit the header budget.",
            ["origin"],
            registry=r,
        )
        self.omitted = Counter(
            "flagproxy_flag_entries_omitted",
            "Flag entries (values and configs) dropped by trimming.",
            ["origin"],
            registry=r,
        )
        self.near_limit = Counter(
            "flagproxy_header_near_limit",
            "Requests whose header block crossed [header] alert_ratio of the budget without trimming.",
            ["origin"],
            registry=r,
        )
        self.over_budget = Counter(
            "flagproxy_header_over_budget",
            "Requests over the header budget even without flag headers (forwarded without them).",
            ["origin"],
            registry=r,
        )
        self.alerts = Counter(
            "flagproxy_alerts",
            "Alerts by condition and result: sent, failed, suppressed (cooldown), dropped (queue full) "
            "or logged (no Slack configured).",
            ["condition", "result"],
            registry=r,
        )
        self.store_version = Gauge(
            "flagproxy_store_version",
            "Store version of the flags being served (several workers: the lowest).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.store_flags = Gauge(
            "flagproxy_store_flags",
            "Flags in the snapshot being served.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.source_version = Gauge(
            "flagproxy_source_version",
            "Newest version stored per flag source (native document version, Split changeNumber).",
            ["source"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.last_sync = Gauge(
            SYNC_TIMESTAMP,
            "Unix time of the last successful sync per source: redis (full read or applied change), "
            "split (API pull), file (flags file or disk snapshot loaded).",
            ["source"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_connected = Gauge(
            "flagproxy_redis_connected",
            "1 while the Redis store's pub/sub subscription is up (several workers: 0 if any is down).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_reconnects = Counter(
            "flagproxy_redis_reconnects",
            "Times the Redis pub/sub connection was lost after it had been up.",
            registry=r,
        )
        self.store_rollbacks = Counter(
            "flagproxy_store_rollbacks",
            "Times Redis held an older state than the one served here: restored (this instance wrote "
            "its newer state back) or adopted (it took a state that may lack changes it had served).",
            ["outcome"],
            registry=r,
        )
        self.exposures_recorded = Counter(
            "flagproxy_exposures_recorded",
            "Exposures of experiment flags written: new (a unit's first), repeat (same variant again), "
            "multiple (another variant; the unit keeps its first).",
            ["result"],
            registry=r,
        )
        self.exposures_deduplicated = Counter(
            "flagproxy_exposures_deduplicated",
            "Exposures not written because this process had already written the same one.",
            registry=r,
        )
        self.exposures_dropped = Counter(
            "flagproxy_exposures_dropped",
            "Exposure and conversion records lost: the queue was full, or the store failed until shutdown.",
            registry=r,
        )
        self.conversions = Counter(
            "flagproxy_conversions",
            "Conversions by goal ('other' for goals no experiment or [[goals]] names) and result: counted, "
            "duplicate, unattributed, before_exposure, outside_window, no_experiment.",
            ["goal", "result"],
            registry=r,
        )
        self.experiment_writes = Histogram(
            "flagproxy_experiment_write_seconds",
            "Time to write one batch of exposures and conversions, by backend.",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.experiment_write_errors = Counter(
            "flagproxy_experiment_write_errors",
            "Batches of exposures and conversions the backend failed to write (each is retried).",
            ["backend"],
            registry=r,
        )
        self.client_requests = Counter(
            "flagproxy_client_requests",
            "Client flags API requests by endpoint (ofrep_single, ofrep_bulk, compact, stream), status "
            "and client key name ('none' before a key is known).",
            ["endpoint", "status", "key"],
            registry=r,
        )
        self._client_children: dict[tuple[str, int, str], Any] = {}
        self.client_over_budget = Counter(
            "flagproxy_client_payload_over_budget",
            "Compact client responses larger than [client_api] max_payload_bytes (still sent), by key.",
            ["key"],
            registry=r,
        )
        self.client_streams = Gauge(
            "flagproxy_client_streams",
            "Open live-update (SSE) streams of the client flags API.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_invalid = Gauge(
            "flagproxy_store_invalid_definitions",
            "Stored definitions per source that do not compile (their flag keeps its last good "
            "definition, or is not served if it never had one).",
            ["source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.webhooks = Counter(
            "flagproxy_webhooks",
            "Webhook requests by source and result (applied, unchanged, accepted, or the error code).",
            ["source", "result"],
            registry=r,
        )
        self.source_syncs = Counter(
            "flagproxy_source_syncs",
            "Background pulls from a flag source's API (e.g. split) by result: ok or error.",
            ["source", "result"],
            registry=r,
        )
        self.observer_errors = Counter(
            "flagproxy_observer_errors",
            "Exchanges an observer raised on (the request itself was not affected).",
            ["observer"],
            registry=r,
        )
        self.observer_drops = Counter(
            "flagproxy_observer_dropped",
            "Exchanges not handed to a queued observer because its queue was full.",
            ["observer"],
            registry=r,
        )
        self.rejections = Counter(
            "flagproxy_rejected_requests",
            "Requests refused before routing, by error: bad_request (malformed framing, answered 400) "
            "or request_head_too_large (431).",
            ["error"],
            registry=r,
        )
        self.split_impressions = Counter(
            "flagproxy_split_impressions",
            "Split impressions by result: sent (Split accepted them), deduplicated (optimized mode: a "
            "repeat within the hour, counted only), counted (mode none or impressionsDisabled: counts and "
            "unique keys only), dropped (a queue was full) or failed (not accepted after retries).",
            ["result"],
            registry=r,
        )
        self.split_events = Counter(
            "flagproxy_split_events",
            "Conversions sent to Split as events by result: sent, invalid (refused as the SDK's track() "
            "refuses them), dropped (queue full) or failed (not accepted after retries).",
            ["result"],
            registry=r,
        )
        self.split_posts = Counter(
            "flagproxy_split_posts",
            "POST attempts to Split's events and telemetry APIs by endpoint (impressions, counts, "
            "unique_keys, events) and result (ok or error; each retry counts).",
            ["endpoint", "result"],
            registry=r,
        )
        self._scrape_collector: Any = None
        self._invalid_sources: set[str] = set()

    # --- events -----------------------------------------------------------------------------------

    def for_origin(self, label: str) -> OriginMetrics:
        return OriginMetrics(self, label)

    def client_request(self, endpoint: str, status: int, key: str) -> None:
        child = self._client_children.get((endpoint, status, key))
        if child is None:  # a handful: endpoints x statuses x configured key names
            child = self._client_children[(endpoint, status, key)] = self.client_requests.labels(
                endpoint, str(status), key
            )
        child.inc()

    def rejected(self, error: str) -> None:
        self.rejections.labels(error).inc()

    def observer_failed(self, observer: str) -> None:
        self.observer_errors.labels(observer).inc()

    def observer_dropped(self, observer: str, count: int) -> None:
        self.observer_drops.labels(observer).inc(count)

    def source_synced(self, source: str, ok: bool) -> None:
        """One background pull from ``source``: counted by result, and its sync time when it worked."""
        self.source_syncs.labels(source, "ok" if ok else "error").inc()
        if ok:
            self.synced(source)

    def alert(self, condition: str, result: str) -> None:
        self.alerts.labels(condition, result).inc()

    def webhook(self, source: str, result: str) -> None:
        self.webhooks.labels(source, result).inc()

    def synced(self, source: str, at: float | None = None) -> None:
        self.last_sync.labels(source).set(time.time() if at is None else at)

    def snapshot_installed(
        self,
        version: int,
        flags: int,
        source_versions: dict[str, dict[str, int]],
        invalid: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.store_version.set(version)
        self.store_flags.set(flags)
        for source, kinds in source_versions.items():
            if kinds:
                self.source_version.labels(source).set(max(kinds.values()))
        invalid = invalid or {}
        for source in self._invalid_sources | set(invalid):
            self.store_invalid.labels(source).set(len(invalid.get(source, {})))
        self._invalid_sources |= set(invalid)

    def store_rolled_back(self, outcome: str) -> None:
        """Redis held an older state than this instance served: ``restored`` or ``adopted``."""
        self.store_rollbacks.labels(outcome).inc()

    def exposures(self, result: str, count: int) -> None:
        """Exposure records: a backend outcome, or ``deduplicated`` / ``dropped``."""
        if result == "deduplicated":
            self.exposures_deduplicated.inc(count)
        elif result == "dropped":
            self.exposures_dropped.inc(count)
        else:
            self.exposures_recorded.labels(result).inc(count)

    def experiment_conversions(self, goal: str, result: str, count: int) -> None:
        self.conversions.labels(goal, result).inc(count)

    def experiment_write(self, backend: str, seconds: float, ok: bool) -> None:
        self.experiment_writes.labels(backend).observe(seconds)
        if not ok:
            self.experiment_write_errors.labels(backend).inc()

    # --- exposition -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every family, plus ``flagproxy_last_sync_age_seconds`` derived at scrape time."""
        if self.multiprocess:
            if self._scrape_collector is None:
                from prometheus_client.multiprocess import MultiProcessCollector

                self._scrape_collector = MultiProcessCollector(None)  # type: ignore[no-untyped-call]
            families: Iterable[Metric] = self._scrape_collector.collect()
        else:
            families = self.registry.collect()
        now = time.time()
        ages = GaugeMetricFamily(
            "flagproxy_last_sync_age_seconds",
            "Seconds since the last successful sync per source (several workers: the most stale).",
            labels=["source"],
        )
        for family in families:
            if family.name == SYNC_TIMESTAMP:
                for sample in family.samples:
                    if sample.value > 0:
                        ages.add_metric([sample.labels["source"]], max(0.0, now - sample.value))
            yield family
        yield ages

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for (Prometheus text by default)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self), content_type  # Metrics has collect(): all the encoder needs


def forget_dead_workers() -> None:
    """Drop the live-gauge files of processes that are gone (a worker that crashed left them)."""
    if not multiprocess_enabled():
        return
    from prometheus_client import multiprocess

    directory = os.environ.get(MULTIPROC_ENV, "")
    for name in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = name.rsplit("_", 1)[-1][: -len(".db")]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def process_exiting() -> None:
    """Take this process's live gauges out of the merged view (its counters stay counted)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
