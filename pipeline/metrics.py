"""Prometheus metrics of the worker (DESIGN.md §5): prefix incstream_, base units, no doc_id.

Reuse ratio and rates are left to PromQL, e.g.
    rate(incstream_events_total{outcome="ok"}[1m])
    histogram_quantile(0.99, rate(incstream_processing_seconds_bucket[5m]))
    # times fewer MACs than re-running the dense original model on every revision
    sum(rate(incstream_dense_equivalent_macs_total[5m]))
      / sum(rate(incstream_inference_macs_total[5m]))
    # hot-cache hit ratio
    rate(incstream_session_cache_hits_total[5m])
      / (rate(incstream_session_cache_hits_total[5m])
         + rate(incstream_session_cache_misses_total[5m])
         + sum(rate(incstream_session_rebuilds_total[5m])))
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from incstream.pipeline.records import DEAD_LETTER_REASONS

disable_created_metrics()  # no *_created series: they double the scrape for no dashboard use

# Work on one event: from sub-millisecond edits to a long document built from scratch.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60)
# Producer to published update: includes any backlog, so minutes must still be told apart
# (a top bucket of 10 s once held 369 of 550 observations and p99 read "10 s").
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                      300, 600)
# A state record above this share of INCSTREAM_MAX_STATE_BYTES counts as near the budget.
NEAR_BUDGET = 0.8


class WorkerMetrics:
    """One worker's metrics, in their own registry (so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        # and python_info (a registry of its own gets none of them by default).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.events = Counter(
            "incstream_events_total",
            "Edit events consumed, by outcome (ok, duplicate, gap = held, dlq)",
            ["outcome"],
            registry=r,
        )
        self.redelivered = Counter(
            "incstream_redelivered_events_total",
            "Events handed to the agent again at an offset this process had already handled "
            "(at-least-once around a restart's seek); they are also in incstream_events_total, "
            "as duplicates",
            registry=r,
        )
        self.chunk_record_bytes = Counter(
            "incstream_chunk_record_bytes_total",
            "Bytes of fast-mode chunk records written to the activations table (and its "
            "changelog)",
            registry=r,
        )
        self.dead_letters = Counter(
            "incstream_dead_letters_total",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.dead_letter_failures = Counter(
            "incstream_dead_letter_failures_total",
            "Dead letters that could not be published (still counted in "
            "incstream_dead_letters_total; the worker log has the event's reason)",
            registry=r,
        )
        self.unreadable_states = Counter(
            "incstream_unreadable_states_total",
            "Stored document states that could not be read; each was reset to await a "
            "snapshot (a state_unreadable dead letter) or replaced by the snapshot that met it",
            registry=r,
        )
        self.store_rebuilds = Counter(
            "incstream_store_rebuilds_total",
            "Local table stores (one per partition) found damaged at start and moved aside; "
            "each partition is rebuilt from the table's changelog",
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
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        # The next three: the table's partitions this worker holds, counted after each
        # recovery and kept current by every write (pipeline.state_totals).
        self.held_events = Gauge(
            "incstream_held_events", "Events held waiting for a missing revision", registry=r
        )
        self.documents = Gauge(
            "incstream_documents", "Documents in the table partitions this worker holds",
            registry=r,
        )
        self.state_bytes = Gauge(
            "incstream_state_bytes",
            "Encoded size of the document states in the table partitions this worker holds",
            registry=r,
        )
        self.state_record_bytes = Histogram(
            "incstream_state_record_bytes",
            "Size of one document-state record written to the table (and its changelog)",
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=r,
        )
        self.state_record_budget_bytes = Gauge(
            "incstream_state_record_budget_bytes",
            "The most one document-state record may hold (INCSTREAM_MAX_STATE_BYTES); a "
            "document past it is refused (state_too_large)",
            registry=r,
        )
        self.state_records_near_budget = Counter(
            "incstream_state_records_near_budget_total",
            f"Document-state records written above {NEAR_BUDGET:.0%} of the record budget "
            "(documents about to be refused as state_too_large)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "incstream_consumer_lag_messages",
            "Events in the edits topic past the group's committed offset (high-water mark minus "
            "committed, both from the broker; read but unfinished events count), by partition "
            "this worker holds",
            ["partition"],
            registry=r,
        )
        # The classifier (pipeline.document_sessions). MACs are counted by engine.model.macs;
        # the dense
        # equivalent is the original model re-run on the whole document at every revision.
        self.inference_macs = Counter(
            "incstream_inference_macs_total",
            "Multiply-accumulates spent classifying revisions, by path (incremental = a cached "
            "session updated, fresh = a session built from the text)",
            ["path"],
            registry=r,
        )
        self.dense_equivalent_macs = Counter(
            "incstream_dense_equivalent_macs_total",
            "MACs the dense original model would have spent re-running every classified "
            "revision's whole document",
            registry=r,
        )
        self.chunk_cache_equivalent_macs = Counter(
            "incstream_chunk_cache_equivalent_macs_total",
            "MACs the chunk-cache peer (dense model re-run on the chunks whose token ids "
            "changed) would have spent on every classified revision",
            registry=r,
        )
        self.positions_recomputed = Counter(
            "incstream_positions_recomputed_total",
            "Token positions (rows) recomputed, summed over layers, by path",
            ["path"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "incstream_inference_seconds",
            "Time to classify one revision (incremental update or fresh build, plus the head)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_batch_size = Histogram(
            "incstream_inference_batch_size",
            "Documents per inference step: the incremental updates of several documents go "
            "through one batched engine step; a fresh build counts as a step of 1",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_events = Histogram(
            "incstream_batch_events",
            "Events the agent took at once (at most INCSTREAM_BATCH_MAX_EVENTS)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.session_cache_hits = Counter(
            "incstream_session_cache_hits_total",
            "Revisions answered by updating a cached session incrementally",
            registry=r,
        )
        self.session_cache_misses = Counter(
            "incstream_session_cache_misses_total",
            "Revisions with no cached session (new document, restart, eviction, snapshot)",
            registry=r,
        )
        self.session_rebuilds = Counter(
            "incstream_session_rebuilds_total",
            "Cached sessions discarded and rebuilt from the durable text, by reason (stale = "
            "its text was not the revision's previous text; text_mismatch = wrong text after "
            "the edit; error = the incremental update raised)",
            ["reason"],
            registry=r,
        )
        self.session_cache_evictions = Counter(
            "incstream_session_cache_evictions_total",
            "Sessions dropped from the hot cache to stay within its memory budget",
            registry=r,
        )
        self.session_cache_bytes = Gauge(
            "incstream_session_cache_bytes", "Activation bytes held by the hot session cache",
            registry=r,
        )
        self.session_cache_budget_bytes = Gauge(
            "incstream_session_cache_budget_bytes", "Memory budget of the hot session cache",
            registry=r,
        )
        self.session_cache_sessions = Gauge(
            "incstream_session_cache_sessions", "Documents with a session in the hot cache",
            registry=r,
        )
        self.broker_unreachable_seconds = Gauge(
            "incstream_broker_unreachable_seconds",
            "Seconds the broker has not answered or has lacked this worker's topics (0: fine; "
            "the worker exits after INCSTREAM_BROKER_LOST_EXIT_S)",
            registry=r,
        )
        self.memory_budget_bytes = Gauge(
            "incstream_memory_budget_bytes",
            "Resident memory the worker may hold, model and sessions included (0: no budget)",
            registry=r,
        )
        self.max_document_tokens = Gauge(
            "incstream_max_document_tokens",
            "Largest document (tokens) this worker classifies: INCSTREAM_MAX_DOCUMENT_TOKENS, "
            "or what one session may hold within the session budget; larger ones are "
            "dead-lettered document_too_large",
            registry=r,
        )
        self.model_info = Gauge(
            "incstream_model_info", "The model bundle this worker classifies with (value 1)",
            ["model"],
            registry=r,
        )
        for path in ("incremental", "fresh"):
            self.inference_macs.labels(path)
            self.positions_recomputed.labels(path)
        for reason in ("stale", "text_mismatch", "error"):
            self.session_rebuilds.labels(reason)
        for outcome in ("ok", "duplicate", "gap", "dlq"):
            self.events.labels(outcome)  # export zeros from the start
        for reason in DEAD_LETTER_REASONS:  # a restart must not make a reason's series vanish
            self.dead_letters.labels(reason)
