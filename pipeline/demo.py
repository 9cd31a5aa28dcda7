"""`incstream demo`: the whole system on one machine, from nothing, and back to nothing.

Starts the embedded broker and a worker process, replays an edit stream (by default the one
bundled with the package), prints each doc-class/v1 update as it arrives, checks that every
revision came back once with the checksum the producer expected, prints a summary with the
worker's own metrics, and stops everything cleanly.

The compute it saves is shown against both peers a user would run instead (see
pipeline.peer_classifiers): the chunk cache (dense re-runs of the chunks whose ids changed)
and the full dense re-run, as the worker counts them (incstream_chunk_cache_equivalent_macs_total,
incstream_dense_equivalent_macs_total against incstream_inference_macs_total): live, every
few seconds while updates arrive, and in the summary.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from incstream.pipeline.broker import EmbeddedBroker
from incstream.pipeline.producer import read_events, replay
from incstream.pipeline.settings import Settings
from incstream.pipeline.stream_files import select_events
from incstream.pipeline.topic_reader import TopicReader
from incstream.pipeline.topics import ensure_topics
from incstream.pipeline.worker_process import WorkerProcess

console = Console(stderr=True)
SAVINGS_EVERY_S = 3.0  # how often the live compute line is refreshed while updates arrive


def bundled_stream() -> Path:
    return Path(__file__).parent / "data" / "demo-edits.jsonl.gz"


def metric_value(metrics_text: str, name: str, labels: str = "",
                 default: float | None = None) -> float:
    """One sample from a Prometheus text page. A missing sample raises KeyError (a renamed
    metric must not read as 0), unless a `default` is given for a labelled series that may
    legitimately not exist yet (a label value never seen)."""
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", metrics_text, flags=re.MULTILINE)
    if match:
        return float(match.group(1))
    if default is None:
        raise KeyError(f"metric {name}{{{labels}}} not on the page")
    return default


def compute_saved(metrics_text: str) -> dict[str, float] | None:
    """MACs the worker spent, and what the chunk-cache peer and the full dense re-run would
    have spent on the same revisions (None before any was classified, or without a model)."""
    spent = sum(metric_value(metrics_text, "incstream_inference_macs_total", f'path="{path}"',
                             default=0.0) for path in ("incremental", "fresh"))
    if not spent:
        return None
    return {"spent": spent,
            "chunk_cache": metric_value(metrics_text,
                                        "incstream_chunk_cache_equivalent_macs_total"),
            "full_dense": metric_value(metrics_text, "incstream_dense_equivalent_macs_total")}


def savings_line(saved: dict[str, float]) -> str:
    spent = saved["spent"]
    return (f"{spent / 1e9:.1f} GMAC spent; chunk cache {saved['chunk_cache'] / 1e9:.1f} "
            f"({saved['chunk_cache'] / spent:.1f}x), full dense re-run "
            f"{saved['full_dense'] / 1e9:.1f} ({saved['full_dense'] / spent:.1f}x)")


def run_demo(
    stream: Path | None = None,
    docs: int | None = None,
    limit: int | None = None,
    rate: float = 0.0,
    quiet: bool = False,
    timeout_s: float = 300.0,
    workdir: Path | None = None,
    model: str | None = None,
) -> bool:
    started = time.monotonic()
    stream = stream or bundled_stream()
    events = select_events(read_events(stream), docs=docs, limit=limit)
    expected = {(e["doc_id"], e["rev"]): e.get("sha1_after") for e in events}
    console.rule("[bold]incstream demo")
    console.print(f"stream {stream} : {len(events)} events, "
                  f"{len({e['doc_id'] for e in events})} documents")

    if workdir is None:
        # Logs and the worker's RocksDB live only as long as the demo (its summary says what
        # they held; a failed demo prints the worker log's tail first).
        with tempfile.TemporaryDirectory(prefix="incstream-demo-") as tmp:
            return _run(events, expected, started, Path(tmp), rate, quiet, timeout_s, model)
    workdir.mkdir(parents=True, exist_ok=True)
    return _run(events, expected, started, workdir, rate, quiet, timeout_s, model)


def _run(events: list[dict[str, Any]], expected: dict[tuple[str, int], Any],
         started: float, workdir: Path, rate: float, quiet: bool, timeout_s: float,
         model: str | None) -> bool:
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        console.print(f"broker  {broker.url} (tansu, in memory)")
        settings = Settings(broker=broker.url, partitions=4)
        ensure_topics(settings)
        worker = WorkerProcess(
            broker.url, data_dir=workdir / "worker", log_path=workdir / "worker.log",
            extra_args=["--model", model] if model else [],
        ).start()
        console.print(f"worker  pid {worker.process.pid}, metrics {worker.metrics_url}, "
                      f"logs {workdir / 'worker.log'}")

        last_savings = [0.0]  # the first labelled update shows it at once

        def show_savings() -> None:
            """Every few seconds, what the worker has saved so far (scraped from /metrics)."""
            if time.monotonic() - last_savings[0] < SAVINGS_EVERY_S:
                return
            last_savings[0] = time.monotonic()
            try:
                saved = compute_saved(worker.scrape(timeout_s=2.0))
            except (OSError, KeyError):
                return  # a live extra; the summary reads the metrics strictly
            if saved:
                console.print(f"[cyan]compute so far[/cyan]: {savings_line(saved)}",
                              highlight=False)

        def show(topic: str, record: dict[str, Any]) -> None:
            if quiet:
                return
            if topic == settings.dlq_topic:
                console.print(f"[red]DLQ[/red] {record['reason']}: {record['error']}")
                return
            change = record["change"]
            what = "snapshot" if record["snapshot"] else (
                f"@{change['start']} -{change['deleted']} +{change['inserted']}")
            answer = ""
            if record.get("label") is not None:
                cost = record["cost"]
                answer = (f"  {record['label']} {max(record['scores'].values()):.3f}"
                          f"{' (changed)' if record['label_changed'] else ''}"
                          f"  {cost['cache']}")
                if cost["macs_incremental"]:
                    ratio = cost["macs_dense_equivalent"] / cost["macs_incremental"]
                    answer += f" {ratio:.1f}x fewer MACs"
            console.print(
                f"{record['doc_id']:<14} r{record['rev']:<4} {what:<18} "
                f"{record['length_chars']:>6} ch {record['length_tokens']:>5} tok "
                f"{record['cost']['latency_s'] * 1000:6.1f} ms{answer}",
                highlight=False, soft_wrap=True,
            )
            if record.get("label") is not None:
                show_savings()

        reader = TopicReader(
            broker.bootstrap, [settings.classes_topic, settings.dlq_topic], on_record=show
        ).start()
        try:
            worker.wait_serving()
            replay(events, broker.bootstrap, settings.edits_topic, rate=rate,
                   total=len(events))
            console.print("waiting for the worker (its first consumer-group join takes a "
                          "while on the embedded broker) ...")

            def all_answered() -> bool:
                return {(r["doc_id"], r["rev"]) for r in reader.of(settings.classes_topic)} \
                    >= set(expected)

            complete = reader.wait_for(all_answered, timeout_s)
            metrics_text = worker.scrape()
        finally:
            reader.stop()
            code, stop_s = worker.stop()

    updates = reader.of(settings.classes_topic)
    seen = {(r["doc_id"], r["rev"]): r for r in updates}
    wrong = [key for key, sha1 in expected.items()
             if sha1 and key in seen and seen[key]["sha1"] != sha1]
    latencies = sorted(r["cost"]["latency_s"] * 1000 for r in updates)
    summary = Table(title="incstream demo summary", show_header=False)
    summary.add_row("events produced", str(len(events)))
    summary.add_row("updates received", f"{len(updates)} ({len(seen)} distinct revisions)")
    summary.add_row("revisions missing", str(len(set(expected) - set(seen))))
    summary.add_row("checksum mismatches", str(len(wrong)))
    summary.add_row("dead letters", str(len(reader.of(settings.dlq_topic))))
    for outcome in ("ok", "duplicate", "gap", "dlq"):
        value = metric_value(metrics_text, "incstream_events_total", f'outcome="{outcome}"',
                             default=0.0)
        summary.add_row(f"worker events {outcome}", f"{value:.0f}")
    finals: dict[str, dict[str, Any]] = {}
    for record in updates:
        if record["rev"] >= finals.get(record["doc_id"], {"rev": -1})["rev"]:
            finals[record["doc_id"]] = record
    models = {r["model"] for r in updates}
    summary.add_row("model", ", ".join(sorted(m or "none (text only)" for m in models)))
    for doc_id, record in sorted(finals.items()):
        if record["label"] is None:
            continue
        changes = sum(1 for r in updates if r["doc_id"] == doc_id and r["label_changed"])
        summary.add_row(f"final label {doc_id}",
                        f"r{record['rev']} {record['label']} "
                        f"{record['scores'][record['label']]:.3f} ({changes} changes)")
    saved = compute_saved(metrics_text)
    if saved:
        hits = metric_value(metrics_text, "incstream_session_cache_hits_total")
        misses = metric_value(metrics_text, "incstream_session_cache_misses_total")
        summary.add_row("MACs spent by the engine", f"{saved['spent'] / 1e9:.1f} GMAC")
        for peer, name in (("chunk_cache", "chunk-cache peer"),
                           ("full_dense", "full dense re-run")):
            summary.add_row(f"MACs the {name} would spend",
                            f"{saved[peer] / 1e9:.1f} GMAC "
                            f"({saved[peer] / saved['spent']:.1f}x the engine's)")
        summary.add_row("session cache hits / misses", f"{hits:.0f} / {misses:.0f}")
    if latencies:
        summary.add_row("processing latency median / p90",
                        f"{statistics.median(latencies):.1f} / "
                        f"{latencies[int(0.9 * (len(latencies) - 1))]:.1f} ms")
    summary.add_row("worker stop (SIGTERM)", f"exit {code} in {stop_s:.1f} s")
    summary.add_row("wall time", f"{time.monotonic() - started:.1f} s")
    console.print(summary)
    ok = complete and not wrong and code == 0
    if not ok and (workdir / "worker.log").is_file():
        log_tail = (workdir / "worker.log").read_text(errors="replace").splitlines()[-40:]
        console.print("worker log (last lines):\n" + "\n".join(log_tail), highlight=False,
                      markup=False)
    console.print("[green]demo OK[/green]" if ok else "[red]demo FAILED[/red]")
    return ok
