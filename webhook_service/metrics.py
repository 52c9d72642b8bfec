"""Prometheus metrics. Under gunicorn, PROMETHEUS_MULTIPROC_DIR makes them add up across workers."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

CALLBACKS = Counter(
    "plivo_callbacks_total",
    "Plivo callbacks received, by endpoint kind and outcome",
    ["kind", "outcome"],  # outcome: recorded, duplicate, ignored, failed, rejected, too_large, unavailable
)
PROJECTIONS = Counter("projections_total", "Session projections, by outcome", ["outcome"])  # projected, failed
PROJECTION_LAG = Histogram(
    "projection_lag_seconds",
    "From a fact's commit (its projection-queue row) to the commit of the projection that read it",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PROJECTION_BACKLOG_AGE = Gauge(
    "projection_oldest_due_seconds", "Age of the oldest fact not yet projected (0: nothing due)",
    multiprocess_mode="mostrecent",  # read from the database at each scrape, whichever worker answers
)
STORE_BATCH = Histogram(
    "webhook_store_batch_size",
    "Callbacks committed together in one transaction by the webhook path's group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
SIGNATURE_FAILURES = Counter("plivo_signature_failures_total", "Callbacks refused for a missing or bad signature")
PLIVO_CALLS = Counter("plivo_api_calls_total", "Calls to Plivo's API, by operation and outcome", ["op", "outcome"])
PLIVO_LATENCY = Histogram(
    "plivo_api_latency_seconds",
    "Latency of Plivo API calls (each attempt)",
    ["op"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Request latency by route and status class",
    ["route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
REQUESTS_TOO_LARGE = Counter(
    "http_requests_too_large_total",
    "Requests the app refused 413 for their body size (WEBHOOK_MAX_BODY_BYTES on callbacks, 1 MiB on the API),"
    " by route (gunicorn's own refusals: gunicorn_requests_refused_total; nginx's: nginx_requests_refused_total)",
    ["route"],
)
INBOX_FAILED = Gauge(
    "plivo_callback_inbox_failed", "Stored callbacks whose application failed (awaiting replay)",
    multiprocess_mode="mostrecent",  # set at each scrape from the database, whichever worker answers
)
RECONCILE_DRIFT = Gauge(
    "plivo_reconcile_drift_sessions", "Sessions whose totals differ from Plivo's at the last reconciliation",
    multiprocess_mode="mostrecent",
)


def render(*extra: Collector) -> tuple[bytes, str]:
    """The exposition text for /metrics, summed over every worker when running multi-process, with
    `extra` collectors' figures (read at each scrape, e.g. the nginx in front)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        if not extra:
            return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        registry.register(_Everything(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Everything(Collector):
    """Another registry's metrics, in this one."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
