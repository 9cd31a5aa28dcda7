"""Prometheus metrics of the worker (DESIGN.md §5): prefix incstream_, base units, no doc_id.

Reuse ratio and rates are left to PromQL, e.g.
    rate(incstream_events_total{outcome="ok"}[1m])
    histogram_quantile(0.99, rate(incstream_processing_seconds_bucket[5m]))
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the scrape for no dashboard use

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """One worker's metrics, in their own registry (so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "incstream_events_total",
            "Edit events consumed, by outcome (ok, duplicate, gap = held, dlq)",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "incstream_dead_letters_total",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.outputs = Counter(
            "incstream_outputs_total",
            "doc-class/v1 records published, one per applied revision (a held event counts "
            "when it is finally applied)",
            registry=r,
        )
        self.label_changes = Counter(
            "incstream_label_changes_total", "Updates whose label differs from the previous one",
            registry=r,
        )
        self.processing_seconds = Histogram(
            "incstream_processing_seconds",
            "Time from taking an event off the stream to having published its results",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "incstream_end_to_end_seconds",
            "Time from the producer's Kafka timestamp to the published update",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.held_events = Gauge(
            "incstream_held_events", "Events held waiting for a missing revision", registry=r
        )
        self.documents = Gauge(
            "incstream_documents", "Documents whose state this worker has written", registry=r
        )
        self.state_bytes = Gauge(
            "incstream_state_bytes", "Encoded size of the document states this worker wrote",
            registry=r,
        )
        self.state_record_bytes = Histogram(
            "incstream_state_record_bytes",
            "Size of one document-state record written to the table (and its changelog)",
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=r,
        )
        self.consumer_lag = Gauge(
            "incstream_consumer_lag_messages",
            "Messages in the edits topic not yet read by this worker, by partition",
            ["partition"],
            registry=r,
        )
        for outcome in ("ok", "duplicate", "gap", "dlq"):
            self.events.labels(outcome)  # export zeros from the start
