"""`incstream bench pipeline`: throughput of one worker through a real broker.

The stream is produced first (so the producer's speed is measured separately and the worker
faces a full backlog), then one worker is started and timed while it drains the backlog:
events/s = events / (last update's arrival - first update's arrival). Per-event processing
latency comes from the records themselves (cost.latency_s).
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


def run_pipeline_bench(
    stream: Path, docs: int | None, limit: int | None, partitions: int, timeout_s: float
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
                               log_path=workdir / "worker.log").start()
        try:
            worker_started = time.monotonic()
            done = reader.wait_for(
                lambda: {(r["doc_id"], r["rev"]) for r in reader.of(settings.classes_topic)}
                >= expected,
                timeout_s,
            )
            finished = time.monotonic()
        finally:
            reader.stop()
            code, stop_s = worker.stop()
    updates = reader.of(settings.classes_topic)
    drain_s = max(arrivals) - min(arrivals) if len(arrivals) > 1 else float("nan")
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
        "worker_stop": {"exit_code": code, "seconds": stop_s},
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "model": None,
    }


@click.command("pipeline")
@click.option("--stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream (.jsonl or .jsonl.gz)")
@click.option("--docs", type=int, default=None, help="only the first N documents")
@click.option("--limit", type=int, default=None, help="only the first N events")
@click.option("--partitions", type=int, default=4, show_default=True)
@click.option("--timeout", type=float, default=900.0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write the result JSON here")
def pipeline_bench_command(stream: Path, docs: int | None, limit: int | None, partitions: int,
                           timeout: float, json_out: Path | None) -> None:
    """Events/s of one worker draining a replayed stream through the embedded broker."""
    result = run_pipeline_bench(stream, docs, limit, partitions, timeout)
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
    table.add_row("worker start to done", f"{result['worker_start_to_done_s']:.1f} s")
    Console(stderr=True).print(table)
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    click.echo(text)
