"""`incstream bench pipeline`: throughput of one worker through a real broker.

The stream is produced first (so the producer's speed is measured separately and the worker
faces a full backlog), then one worker is started and timed while it drains the backlog:
events/s = events / (last update's arrival - first update's arrival). Per-event processing
latency comes from the records themselves (cost.latency_s, and cost.inference_s for the
classifier alone). The worker runs the default model bundle unless `--model none` (text only);
its MAC and session-cache counters are scraped from /metrics before it stops.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.broker import EmbeddedBroker
from pipeline.demo import metric_value
from pipeline.producer import read_events, replay
from pipeline.settings import Settings
from pipeline.stream_files import select_events
from pipeline.topic_reader import TopicReader
from pipeline.topics import ensure_topics
from pipeline.worker_process import WorkerProcess


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"median": statistics.median(ordered), "p10": at(0.10), "p90": at(0.90),
            "p99": at(0.99)}


def _worker_counters(metrics_text: str) -> dict[str, float]:
    def value(name: str, labels: str = "") -> float:
        return metric_value(metrics_text, name, labels)

    spent = {path: value("incstream_inference_macs_total", f'path="{path}"')
             for path in ("incremental", "fresh")}
    dense = value("incstream_dense_equivalent_macs_total")
    total = sum(spent.values())
    return {
        "macs_spent": total,
        "macs_spent_incremental": spent["incremental"],
        "macs_spent_fresh_builds": spent["fresh"],
        "macs_dense_equivalent": dense,
        "macs_dense_over_spent": dense / total if total else None,
        "session_cache_hits": value("incstream_session_cache_hits_total"),
        "session_cache_misses": value("incstream_session_cache_misses_total"),
        "session_rebuilds": sum(value("incstream_session_rebuilds_total", f'reason="{r}"')
                                for r in ("stale", "text_mismatch", "error")),
        "session_cache_evictions": value("incstream_session_cache_evictions_total"),
        "session_cache_bytes_at_end": value("incstream_session_cache_bytes"),
        "label_changes": value("incstream_label_changes_total"),
    }


def run_pipeline_bench(
    stream: Path, docs: int | None, limit: int | None, partitions: int, timeout_s: float,
    model: str | None = None,
) -> dict[str, Any]:
    events = select_events(read_events(stream), docs=docs, limit=limit)
    expected = {(e["doc_id"], e["rev"]) for e in events}
    workdir = Path(tempfile.mkdtemp(prefix="incstream-bench-"))
    arrivals: list[float] = []
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        settings = Settings(broker=broker.url, partitions=partitions)
        ensure_topics(settings)
        produce_started = time.monotonic()
        replay(events, broker.bootstrap, settings.edits_topic, total=len(events))
        produce_s = time.monotonic() - produce_started

        reader = TopicReader(broker.bootstrap, [settings.classes_topic],
                             on_record=lambda *_: arrivals.append(time.monotonic())).start()
        worker = WorkerProcess(broker.url, workdir / "worker", partitions=partitions,
                               log_path=workdir / "worker.log",
                               extra_args=["--model", model] if model else []).start()
        try:
            worker_started = time.monotonic()
            done = reader.wait_for(
                lambda: {(r["doc_id"], r["rev"]) for r in reader.of(settings.classes_topic)}
                >= expected,
                timeout_s,
            )
            finished = time.monotonic()
            try:
                counters = _worker_counters(worker.scrape())
            except OSError as exc:
                counters = {"error": f"could not scrape the worker: {exc}"}
        finally:
            reader.stop()
            code, stop_s = worker.stop()
    updates = reader.of(settings.classes_topic)
    drain_s = max(arrivals) - min(arrivals) if len(arrivals) > 1 else float("nan")
    models = sorted({r.get("model") or "none" for r in updates})
    inference_ms = [r["cost"]["inference_s"] * 1000 for r in updates
                    if "inference_s" in r["cost"]]
    caches = {c: sum(1 for r in updates if r["cost"].get("cache") == c)
              for c in ("hit", "miss", "rebuild")}
    return {
        "bench": "pipeline",
        "stream": str(stream),
        "events": len(events),
        "docs": len({e["doc_id"] for e in events}),
        "partitions": partitions,
        "complete": done,
        "updates": len(updates),
        "produce_events_per_s": len(events) / produce_s,
        "worker_events_per_s": len(updates) / drain_s if drain_s else None,
        "worker_drain_s": drain_s,
        "worker_start_to_done_s": finished - worker_started,
        "processing_latency_ms": _quantiles([r["cost"]["latency_s"] * 1000 for r in updates]),
        "inference_ms": _quantiles(inference_ms) if inference_ms else None,
        "answers_by_cache": caches,
        "worker_counters": counters,
        "worker_stop": {"exit_code": code, "seconds": stop_s},
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "model": ", ".join(models) or None,
    }


@click.command("pipeline")
@click.option("--stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream (.jsonl or .jsonl.gz)")
@click.option("--docs", type=int, default=None, help="only the first N documents")
@click.option("--limit", type=int, default=None, help="only the first N events")
@click.option("--partitions", type=int, default=4, show_default=True)
@click.option("--timeout", type=float, default=900.0, show_default=True)
@click.option("--model", default=None,
              help="model bundle name or directory, or none for text only "
                   "[default: INCSTREAM_MODEL, else polarity-minilm-vq64]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write the result JSON here")
def pipeline_bench_command(stream: Path, docs: int | None, limit: int | None, partitions: int,
                           timeout: float, model: str | None, json_out: Path | None) -> None:
    """Events/s of one worker draining a replayed stream through the embedded broker."""
    result = run_pipeline_bench(stream, docs, limit, partitions, timeout, model=model)
    table = Table(title="incstream bench pipeline")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("events (docs)", f"{result['events']} ({result['docs']})")
    table.add_row("all answered", str(result["complete"]))
    table.add_row("producer events/s", f"{result['produce_events_per_s']:.0f}")
    table.add_row("worker events/s (backlog drain)", f"{result['worker_events_per_s']:.0f}")
    lat = result["processing_latency_ms"]
    table.add_row("processing ms median [p10, p90]",
                  f"{lat['median']:.2f} [{lat['p10']:.2f}, {lat['p90']:.2f}]")
    if result["inference_ms"]:
        inf = result["inference_ms"]
        table.add_row("inference ms median [p10, p90]",
                      f"{inf['median']:.2f} [{inf['p10']:.2f}, {inf['p90']:.2f}]")
        counters = result["worker_counters"]
        table.add_row("answers hit / miss / rebuild",
                      " / ".join(str(v) for v in result["answers_by_cache"].values()))
        if counters.get("macs_dense_over_spent"):
            table.add_row("MACs dense re-runs / spent",
                          f"{counters['macs_dense_over_spent']:.1f}x")
    table.add_row("model", str(result["model"]))
    table.add_row("worker start to done", f"{result['worker_start_to_done_s']:.1f} s")
    Console(stderr=True).print(table)
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    click.echo(text)
