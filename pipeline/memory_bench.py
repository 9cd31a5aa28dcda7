"""`incstream bench memory`: a real worker's resident memory under what stresses it.

Starts the embedded broker and one worker process (its settings from the options and
INCSTREAM_*), waits until it is ready, then sends one scenario:

    big    one document of --tokens tokens (real PEP text, joined), then a small document,
           then an edit that cuts the big one down to --shrink-tokens: the big revision must
           come back as a document_too_large dead letter with label null, the others answered;
    many   --docs documents, each a different window of --doc-chars characters of the PEP
           texts, one snapshot each (the hot cache evicts as it fills).

It reads the worker's memory from /proc/<pid>/status: VmRSS when ready (model loaded, nothing
classified), VmHWM (the peak) and VmRSS at the end, and prints them with the worker's cache
gauges, as JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from incstream.pipeline.broker import EmbeddedBroker
from incstream.pipeline.demo import metric_value
from incstream.pipeline.memory_budget import peak_resident_bytes, resident_bytes
from incstream.pipeline.producer import edit_producer, read_events, send_edit
from incstream.pipeline.settings import Settings
from incstream.pipeline.topics import ensure_topics
from incstream.pipeline.worker_process import WorkerProcess

DEFAULT_STREAM = Path(__file__).resolve().parents[2] / "shared/data/edits/peps-hunks.jsonl.gz"
BUNDLED_STREAM = Path(__file__).resolve().parent / "data" / "demo-edits.jsonl.gz"
MIB = 1024 * 1024


def snapshot_texts(stream: Path) -> list[str]:
    return [event["snapshot"] for event in read_events(stream) if "snapshot" in event]


def text_of_tokens(texts: list[str], tokens: int) -> str:
    """Real text of about `tokens` WordPiece tokens: the stream's snapshots joined (repeated
    when they are too few), cut at a whitespace."""
    from incstream.engine.model.base_model import load_tokenizer

    tokenizer = load_tokenizer()
    joined = "\n\n".join(texts)
    while True:
        ids = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
        if len(ids["input_ids"]) >= tokens:
            return joined[: ids["offset_mapping"][tokens - 1][1]]
        joined = joined + "\n\n" + joined


def windows(texts: list[str], count: int, chars: int) -> list[str]:
    """`count` different windows of `chars` characters, walking the texts."""
    out: list[str] = []
    step = max(1, chars // 3)
    while len(out) < count:
        before = len(out)
        for text in texts:
            for start in range(0, max(1, len(text) - chars), step):
                out.append(text[start : start + chars])
                if len(out) == count:
                    return out
        if len(out) == before:
            raise ValueError("the stream has no text to cut documents from")
        step = max(1, step - 1)
    return out


def _events_consumed(worker: WorkerProcess) -> float:
    page = worker.scrape()
    return sum(metric_value(page, "incstream_events_total", f'outcome="{o}"', 0.0)
               for o in ("ok", "duplicate", "gap", "dlq"))


def run_memory_bench(scenario: str, stream: Path, tokens: int, shrink_tokens: int, docs: int,
                     doc_chars: int, worker_args: list[str], timeout_s: float) -> dict[str, Any]:
    texts = snapshot_texts(stream)
    with tempfile.TemporaryDirectory(prefix="incstream-membench-") as tmp, \
            EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
        settings = Settings(broker=broker.url)
        ensure_topics(settings)
        worker = WorkerProcess(broker.url, Path(tmp) / "worker", log_path=Path(tmp) / "w.log",
                               partitions=settings.partitions, extra_args=worker_args).start()
        try:
            worker.wait_ready(timeout_s=300)
            pid = worker.process.pid
            ready_rss = resident_bytes(pid)
            producer = edit_producer(broker.bootstrap, max_request_size=8 * MIB)
            events: list[dict[str, Any]] = []
            if scenario == "big":
                big = text_of_tokens(texts, tokens)
                small = text_of_tokens(texts[1:], shrink_tokens)
                cut = text_of_tokens(texts, shrink_tokens)
                events = [
                    {"schema": "doc-edit/v1", "doc_id": "big", "rev": 0, "snapshot": big},
                    {"schema": "doc-edit/v1", "doc_id": "small", "rev": 0, "snapshot": small},
                    {"schema": "doc-edit/v1", "doc_id": "big", "rev": 1,
                     "ops": [{"retain": len(cut)}, {"delete": len(big) - len(cut)}]},
                ]
            else:
                events = [{"schema": "doc-edit/v1", "doc_id": f"doc-{i:05d}", "rev": 0,
                           "snapshot": text} for i, text in enumerate(windows(texts, docs,
                                                                               doc_chars))]
            started = time.monotonic()
            for event in events:
                send_edit(producer, settings.edits_topic, event)
            producer.flush()
            producer.close()
            deadline = started + timeout_s
            while _events_consumed(worker) < len(events):
                if not worker.alive():
                    raise RuntimeError(f"the worker exited ({worker.process.returncode}); "
                                       f"see {worker.log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{_events_consumed(worker)} of {len(events)} events "
                                       f"handled in {timeout_s:.0f} s")
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            page = worker.scrape()
            peak, end_rss = peak_resident_bytes(pid), resident_bytes(pid)
        finally:
            code, _ = worker.stop()

    def gauge(name: str, labels: str = "") -> float:
        return metric_value(page, name, labels, 0.0)

    return {
        "scenario": scenario,
        "events": len(events),
        "tokens": tokens if scenario == "big" else None,
        "docs": docs if scenario == "many" else None,
        "doc_chars": doc_chars if scenario == "many" else None,
        "worker_args": worker_args,
        "seconds": round(elapsed, 1),
        "rss_ready_mib": round(ready_rss / MIB) if ready_rss else None,
        "rss_peak_mib": round(peak / MIB) if peak else None,
        "rss_end_mib": round(end_rss / MIB) if end_rss else None,
        "memory_budget_mib": round(gauge("incstream_memory_budget_bytes") / MIB),
        "session_budget_mib": round(gauge("incstream_session_cache_budget_bytes") / MIB),
        "session_cache_mib_at_end": round(gauge("incstream_session_cache_bytes") / MIB),
        "sessions_at_end": gauge("incstream_session_cache_sessions"),
        "evictions": gauge("incstream_session_cache_evictions_total"),
        "max_document_tokens": gauge("incstream_max_document_tokens"),
        "outcomes": {o: gauge("incstream_events_total", f'outcome="{o}"')
                     for o in ("ok", "duplicate", "gap", "dlq")},
        "document_too_large": gauge("incstream_dead_letters_total",
                                    'reason="document_too_large"'),
        "worker_exit_code": code,
    }


@click.command("memory")
@click.option("--scenario", type=click.Choice(["big", "many"]), default="big",
              show_default=True)
@click.option("--stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="edit stream whose snapshots give the text (default: "
              "../shared/data/edits/peps-hunks.jsonl.gz, else the bundled one)")
@click.option("--tokens", type=int, default=200_000, show_default=True,
              help="big: tokens of the large document")
@click.option("--shrink-tokens", type=int, default=2_000, show_default=True,
              help="big: tokens of the small document and of the big one once cut down")
@click.option("--docs", type=int, default=2_000, show_default=True, help="many: documents")
@click.option("--doc-chars", type=int, default=1_200, show_default=True,
              help="many: characters per document")
@click.option("--timeout", type=float, default=3600.0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
def memory_bench_command(scenario: str, stream: Path | None, tokens: int, shrink_tokens: int,
                         docs: int, doc_chars: int, timeout: float, json_out: Path | None,
                         worker_args: tuple[str, ...]) -> None:
    """Resident memory of a real worker with one large document or many documents. Options
    after `--` go to the worker (e.g. -- --mode fast --memory-budget-bytes 3221225472)."""
    stream = stream or (DEFAULT_STREAM if DEFAULT_STREAM.exists() else BUNDLED_STREAM)
    result = run_memory_bench(scenario, stream, tokens, shrink_tokens, docs, doc_chars,
                              list(worker_args), timeout)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
