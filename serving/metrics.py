"""Prometheus metrics of the recall API, on a registry of its own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from common.infra.telemetry import register_build_info

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ServingMetrics:
    """Every figure the serving dashboard reads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        register_build_info(r)
        self.requests = Counter("recstream_serving_requests_total", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("recstream_serving_request_seconds",
                                 "Time to answer a /recall request", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.fallbacks = Counter("recstream_serving_fallbacks_total",
                                 "Answers from the popular-items list", ["reason"], registry=r)
        self.reloads = Counter("recstream_serving_reloads_total",
                               "Model versions loaded", registry=r)
        self.reload_failures = Counter("recstream_serving_reload_failures_total",
                                       "Versions that could not be loaded", registry=r)
        self.deltas = Counter("recstream_serving_index_deltas_total",
                              "Index deltas applied to the live index", registry=r)
        self.index_items = Gauge("recstream_serving_index_items", "Items in the live index",
                                 registry=r)
        self.version = Info("recstream_serving_model_version", "Version being served",
                            registry=r)
