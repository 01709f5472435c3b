"""Per-origin request metrics from each exchange (the Prometheus families are in ``proxy.metrics``)."""

from __future__ import annotations

from proxy.dataplane.exchange import NO_ROUTE, Exchange
from proxy.metrics import Metrics, OriginMetrics


class OriginMetricsObserver:
    """Requests by status class, upstream latency and errors, flag-header bytes, budget events."""

    name = "metrics"
    inline = True  # counter increments and histogram observations, label children bound once

    def __init__(self, metrics: Metrics, labels: list[str]) -> None:
        self.metrics = metrics
        self.by_label: dict[str, OriginMetrics] = {label: metrics.for_origin(label) for label in labels}
        self.no_route = metrics.requests.labels(NO_ROUTE, "4xx")

    def observe(self, exchange: Exchange) -> None:
        label = exchange.origin_label
        if label is None:  # the control plane
            return
        if label == NO_ROUTE:
            self.no_route.inc()
            return
        metrics = self.by_label.get(label)
        if metrics is None:
            metrics = self.by_label[label] = self.metrics.for_origin(label)
        if exchange.fitted is not None:
            metrics.header_bytes.observe(exchange.flag_header_bytes)
            condition = exchange.budget_condition
            if condition is not None:
                metrics.budget_event(condition, exchange.fitted.omitted)
        if exchange.upstream_error is not None:
            metrics.upstream_error(exchange.upstream_error)
        if exchange.upstream_latency_s is not None:
            metrics.latency.observe(exchange.upstream_latency_s)
        metrics.request(exchange.status)
