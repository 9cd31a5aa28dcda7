"""`incstream bench pipeline`: throughput of one worker through a real broker.

One worker is started and made ready first: it must answer a probe document (its own doc id,
left out of every figure), which proves the consumer group has joined, the model is loaded and
the inference thread runs. Start-up is reported on its own (`worker_ready_s`). Then the stream
is produced as fast as the producer goes and the clock runs from the first event sent to the
last answer received:

    events_per_s = revisions answered / (last answer's arrival - first event sent)

Each revision counts once: a second update for the same (doc_id, rev), which at-least-once
delivery allows, is a duplicate, counted apart (`duplicate_updates`) and in no figure. A run
in which a revision of the stream is never answered -- dead-lettered, stuck behind a
dead-lettered revision of its document, or simply not answered before `--timeout` -- has
failed: it reports which revisions were lost and why, gives no rate, and the command exits 1.

End-to-end latency runs from the moment an event is handed to the producer to the arrival
of its answer (replayed as a backlog, it is mostly time spent queued behind earlier events).
Per-revision processing latency comes from the records themselves (cost.latency_s, and
cost.inference_s for the classifier alone). The worker runs the default model bundle unless
`--model none` (text only); its MAC and session-cache counters are scraped from /metrics
before it stops, and once it has stopped the table's changelog topics are read back for the
bytes written per edit and the durable state per document (pipeline.changelog_sizes).
pipeline.pipeline_modes runs this once per classifier (incremental, chunk, dense).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstream.pipeline.broker import EmbeddedBroker
from incstream.pipeline.changelog_sizes import read_changelogs
from incstream.pipeline.demo import metric_value
from incstream.pipeline.producer import edit_producer, read_events, replay, send_edit
from incstream.pipeline.settings import Settings
from incstream.pipeline.stream_files import select_events
from incstream.pipeline.topic_reader import TopicReader
from incstream.pipeline.topics import ensure_topics
from incstream.pipeline.worker_process import WorkerProcess

PROBE_DOC = "__incstream-bench-probe__"
LOST_LISTED = 20  # lost revisions listed one by one in the result (all are counted)

Revision = tuple[str, int]


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"median": statistics.median(ordered), "p10": at(0.10), "p90": at(0.90),
            "p99": at(0.99)}


def _worker_counters(metrics_text: str) -> dict[str, float]:
    def value(name: str, labels: str = "", default: float | None = None) -> float:
        return metric_value(metrics_text, name, labels, default)

    spent = {path: value("incstream_inference_macs_total", f'path="{path}"', 0.0)
             for path in ("incremental", "fresh")}
    dense = value("incstream_dense_equivalent_macs_total")
    chunk_cache = value("incstream_chunk_cache_equivalent_macs_total")
    total = sum(spent.values())
    return {
        "macs_spent": total,
        "macs_spent_incremental": spent["incremental"],
        "macs_spent_fresh_builds": spent["fresh"],
        "macs_dense_equivalent": dense,
        "macs_dense_over_spent": dense / total if total else None,
        "macs_chunk_cache_equivalent": chunk_cache,
        "macs_chunk_cache_over_spent": chunk_cache / total if total else None,
        "table_writes": value("incstream_state_record_bytes_count"),
        "table_write_bytes": value("incstream_state_record_bytes_sum"),
        "session_cache_hits": value("incstream_session_cache_hits_total"),
        "session_cache_misses": value("incstream_session_cache_misses_total"),
        "session_rebuilds": sum(value("incstream_session_rebuilds_total", f'reason="{r}"', 0.0)
                                for r in ("stale", "text_mismatch", "error")),
        "session_cache_evictions": value("incstream_session_cache_evictions_total"),
        "session_cache_bytes_at_end": value("incstream_session_cache_bytes"),
        "label_changes": value("incstream_label_changes_total"),
        # how the agent batched: events taken at once, documents per batched engine step
        **_mean_of(value, "incstream_batch_events", "events_per_batch"),
        **_mean_of(value, "incstream_inference_batch_size", "documents_per_inference_step"),
    }


def _mean_of(value: Any, histogram: str, name: str) -> dict[str, float | None]:
    """A histogram's observations and their mean, as {name}_count and {name}_mean."""
    count = value(f"{histogram}_count", "", 0.0)
    total = value(f"{histogram}_sum", "", 0.0)
    return {f"{name}_count": count, f"{name}_mean": total / count if count else None}


def _dead_letter_revision(record: dict[str, Any]) -> Revision | None:
    """(doc_id, rev) of the event a dead letter carries, if it can be read from it."""
    event = record.get("event")
    if isinstance(event, str | bytes):
        try:
            event = json.loads(event)
        except ValueError:
            return None
    if not isinstance(event, dict):
        return None
    doc_id, rev = event.get("doc_id"), event.get("rev")
    if isinstance(doc_id, str) and isinstance(rev, int) and not isinstance(rev, bool):
        return doc_id, rev
    return None


@dataclass
class Tally:
    """What came back for the stream's revisions, as the reader thread sees it."""

    expected: list[Revision]  # in stream order
    snapshots: set[Revision] = field(default_factory=set)  # which of them are snapshots
    first_answer: dict[Revision, float] = field(default_factory=dict)  # arrival time
    sent: dict[Revision, float] = field(default_factory=dict)  # handed to the producer
    records: dict[Revision, dict[str, Any]] = field(default_factory=dict)  # first update
    duplicate_updates: int = 0
    unexpected_updates: int = 0
    dead_letters: dict[Revision, str] = field(default_factory=dict)  # -> reason
    unreadable_dead_letters: list[str] = field(default_factory=list)  # reasons
    probe_answered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._expected = set(self.expected)
        self._lock = threading.Lock()

    def on_update(self, record: dict[str, Any], arrived: float) -> None:
        key = (record.get("doc_id"), record.get("rev"))
        with self._lock:
            if key[0] == PROBE_DOC:
                self.probe_answered.set()
            elif key not in self._expected:
                self.unexpected_updates += 1
            elif key in self.first_answer:
                self.duplicate_updates += 1
            else:
                self.first_answer[key] = arrived
                self.records[key] = record

    def on_sent(self, event: dict[str, Any], at: float) -> None:
        with self._lock:
            self.sent.setdefault((event["doc_id"], event["rev"]), at)

    def on_dead_letter(self, record: dict[str, Any]) -> None:
        key = _dead_letter_revision(record)
        with self._lock:
            if key is None:
                self.unreadable_dead_letters.append(str(record.get("reason")))
            elif key[0] != PROBE_DOC:
                self.dead_letters.setdefault(key, str(record.get("reason")))

    def lost(self) -> dict[Revision, str]:
        """Revisions that will never be answered now, and why: dead-lettered, or held behind a
        dead-lettered revision of their document with no snapshot after it in the stream."""
        with self._lock:
            out: dict[Revision, str] = {}
            blocked: dict[str, int] = {}  # doc -> the dead-lettered rev it waits behind
            for key in self.expected:
                doc_id, rev = key
                if key in self.snapshots:  # a snapshot resyncs the document
                    blocked.pop(doc_id, None)
                if key in self.first_answer:
                    continue
                if key in self.dead_letters:
                    out[key] = f"dead-lettered ({self.dead_letters[key]})"
                    blocked.setdefault(doc_id, rev)
                elif doc_id in blocked:
                    out[key] = f"held behind dead-lettered rev {blocked[doc_id]}"
            return out

    def settled(self) -> bool:
        """Every revision answered, or lost for good (so waiting longer changes nothing)."""
        lost = self.lost()
        with self._lock:
            return all(k in self.first_answer or k in lost for k in self.expected)


def summarize(tally: Tally, first_sent: float | None, timeout_s: float,
              worker_exit: int | None = None) -> dict[str, Any]:
    """Counts, the rate and the verdict of a run (pure: the unit tests call it directly)."""
    lost = tally.lost()
    for key in tally.expected:
        if key not in tally.first_answer and key not in lost:
            lost[key] = (f"not answered within {timeout_s:g} s" if worker_exit is None
                         else f"not answered: the worker exited with code {worker_exit}")
    answered = [tally.first_answer[k] for k in tally.expected if k in tally.first_answer]
    complete = not lost and first_sent is not None
    wall = max(answered) - first_sent if answered and first_sent is not None else None
    reasons = Counter(why for why in lost.values())
    failure = None
    if not complete:
        failure = (f"{len(lost)} of {len(tally.expected)} revisions lost: "
                   + "; ".join(f"{n} {why}" for why, n in reasons.most_common()))
        if first_sent is None:
            failure = "the stream was never sent (the worker did not get ready)"
    records = [tally.records[k] for k in tally.expected if k in tally.records]
    inference_ms = [r["cost"]["inference_s"] * 1000 for r in records
                    if "inference_s" in r.get("cost", {})]
    end_to_end = [tally.first_answer[k] - tally.sent[k] for k in tally.expected
                  if k in tally.first_answer and k in tally.sent]
    return {
        "complete": complete,
        "failure": failure,
        "revisions": len(tally.expected),
        "answered": len(answered),
        "lost": len(lost),
        "lost_revisions": [{"doc_id": d, "rev": r, "why": why}
                           for (d, r), why in list(lost.items())[:LOST_LISTED]],
        "dead_letters": dict(Counter(tally.dead_letters.values())),
        "unreadable_dead_letters": len(tally.unreadable_dead_letters),
        "duplicate_updates": tally.duplicate_updates,
        "unexpected_updates": tally.unexpected_updates,
        "wall_s": wall,
        "events_per_s": len(answered) / wall if complete and wall else None,
        "first_answer_s": (min(answered) - first_sent
                           if answered and first_sent is not None else None),
        "processing_latency_ms": (_quantiles([r["cost"]["latency_s"] * 1000 for r in records])
                                  if records else None),
        "inference_ms": _quantiles(inference_ms) if inference_ms else None,
        "end_to_end_latency_s": _quantiles(end_to_end) if end_to_end else None,
        "answers_by_cache": {c: sum(1 for r in records if r.get("cost", {}).get("cache") == c)
                             for c in ("hit", "miss", "rebuild")},
        "models": sorted({r.get("model") or "none" for r in records}),
    }


def _wait(condition, timeout_s: float, worker: WorkerProcess) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if not worker.alive():
            return condition()
        time.sleep(0.1)
    return condition()


def run_pipeline_bench(
    stream: Path, docs: int | None, limit: int | None, partitions: int, timeout_s: float,
    model: str | None = None, ready_timeout_s: float = 300.0,
    worker_args: list[str] | None = None, rate: float = 0.0,
    answers: dict[Revision, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One worker (`incstream worker` with `worker_args`) on a fresh embedded broker; the first
    update of every revision goes into `answers` when it is given."""
    events = select_events(read_events(stream), docs=docs, limit=limit)
    tally = Tally([(e["doc_id"], e["rev"]) for e in events],
                  {(e["doc_id"], e["rev"]) for e in events if "snapshot" in e})
    workdir = Path(tempfile.mkdtemp(prefix="incstream-bench-"))
    first_sent = produce_s = ready_s = None
    worker_exit = None
    counters: dict[str, Any] = {}
    changelogs: dict[str, Any] = {}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        settings = Settings(broker=broker.url, partitions=partitions)
        ensure_topics(settings)

        def on_record(topic: str, record: dict[str, Any]) -> None:
            if topic == settings.classes_topic:
                tally.on_update(record, time.monotonic())
            else:
                tally.on_dead_letter(record)

        reader = TopicReader(broker.bootstrap, [settings.classes_topic, settings.dlq_topic],
                             on_record=on_record).start()
        worker = WorkerProcess(broker.url, workdir / "worker", partitions=partitions,
                               log_path=workdir / "worker.log",
                               extra_args=[*(["--model", model] if model else []),
                                           *(worker_args or [])]).start()
        try:
            started = time.monotonic()
            probe = edit_producer(broker.bootstrap)
            send_edit(probe, settings.edits_topic,
                      {"schema": "doc-edit/v1", "doc_id": PROBE_DOC, "rev": 0,
                       "snapshot": "The worker is ready when it answers this."})
            probe.flush()
            probe.close()
            if _wait(tally.probe_answered.is_set, ready_timeout_s, worker):
                ready_s = time.monotonic() - started
                first_sent = time.monotonic()
                replay(events, broker.bootstrap, settings.edits_topic, rate=rate,
                       total=len(events),
                       on_send=lambda event: tally.on_sent(event, time.monotonic()))
                produce_s = time.monotonic() - first_sent
                _wait(tally.settled, timeout_s, worker)
            if worker.alive():
                try:
                    counters = _worker_counters(worker.scrape())
                except OSError as exc:
                    counters = {"error": f"could not scrape the worker: {exc}"}
            else:
                worker_exit = worker.process.returncode if worker.process else None
        finally:
            reader.stop()
            code, stop_s = worker.stop()
        try:  # stopped: its producer is flushed, the changelogs are complete
            changelogs = read_changelogs(broker.bootstrap, settings.app_id,
                                         frozenset({PROBE_DOC.encode()})).summary(
                len(events), len({e["doc_id"] for e in events}))
        except Exception as exc:  # a figure missing, not a failed run
            changelogs = {"error": f"could not read the changelogs: {exc}"}
    result = summarize(tally, first_sent, timeout_s, worker_exit)
    if answers is not None:
        answers.update(tally.records)
    models = result.pop("models")
    if ready_s is None and result["failure"]:
        result["failure"] += (f"; no answer to the probe within {ready_timeout_s:g} s"
                              + (f" (worker exited with code {worker_exit})"
                                 if worker_exit is not None else "")
                              + f"; see {workdir / 'worker.log'}")
    return {
        "bench": "pipeline",
        "stream": str(stream),
        "events": len(events),
        "docs": len({e["doc_id"] for e in events}),
        "partitions": partitions,
        **result,
        "worker_ready_s": ready_s,
        "produce_s": produce_s,
        "produce_events_per_s": len(events) / produce_s if produce_s else None,
        "worker_counters": counters,
        "changelog": changelogs,
        "worker_args": worker_args or [],
        "worker_stop": {"exit_code": code, "seconds": stop_s},
        "workdir": str(workdir),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "model": ", ".join(models) or None,
        "method": "worker made ready first (answers a probe document); events_per_s = "
                  "revisions answered / (last answer received - first event sent); "
                  "duplicates counted once; no rate unless every revision was answered",
    }


def failure_lines(result: dict[str, Any]) -> Iterable[str]:
    yield f"bench pipeline FAILED: {result['failure']}"
    for lost in result["lost_revisions"]:
        yield f"  {lost['doc_id']} rev {lost['rev']}: {lost['why']}"
    if result["lost"] > len(result["lost_revisions"]):
        yield f"  ... and {result['lost'] - len(result['lost_revisions'])} more"
    yield f"  logs: {result['workdir']}"
