"""The worker's memory budget and the ways it stops, through real worker processes.

- A worker with a small memory budget: a document too large for it is applied to the text but
  not classified (a document_too_large dead letter, label null), others are answered, an edit
  that cuts the large one down is classified again, the hot cache evicts to stay inside its
  budget, and the process's peak resident memory (VmHWM, from /proc) stays under the budget.
- SIGTERM in the middle of a long build: the worker exits well inside the 30 s grace period,
  and the abandoned event is handled again by the next worker (at-least-once).
- A broker restarted on in-memory storage comes back without the worker's topics: readiness
  turns 503, incstream_broker_unreachable_seconds counts, and the worker exits with status 69.

Texts are the bundled real PEP snapshots, repeated to reach a size.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from answers import assert_same_answer
from kafka_tools import produce_raw
from prom import metric

from incstream.engine.incremental.text_ops import sha1_hex
from incstream.pipeline.broker import EmbeddedBroker
from incstream.pipeline.broker_watch import EXIT_BROKER_LOST
from incstream.pipeline.memory_budget import peak_resident_bytes, resident_bytes
from incstream.pipeline.producer import read_events
from incstream.pipeline.settings import Settings
from incstream.pipeline.topic_reader import TopicReader
from incstream.pipeline.topics import ensure_topics
from incstream.pipeline.worker_process import WorkerProcess

pytestmark = pytest.mark.integration

GIB = 1024**3
BUDGET = 3 * GIB // 2  # the worker idles at ~0.6 GiB with the model; 0.5 GiB reserve
GRACE_S = 30.0  # deploy/k8s/worker.yaml terminationGracePeriodSeconds


@pytest.fixture(scope="module")
def pep_text(demo_stream: Path):
    """pep_text(tokens) -> real text of at least that many tokens (PEP snapshots, repeated)."""
    from incstream.engine.model.base_model import load_tokenizer

    snapshots = [e["snapshot"] for e in read_events(demo_stream) if "snapshot" in e]
    tokenizer = load_tokenizer()

    def text(tokens: int, offset: int = 0) -> str:
        parts = snapshots[offset:] + snapshots[:offset]
        joined = "\n\n".join(parts)
        while len(tokenizer(joined, add_special_tokens=False)["input_ids"]) < tokens:
            joined += "\n\n" + "\n\n".join(parts)
        enc = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        return joined[: enc["offset_mapping"][tokens - 1][1]]

    return text


def event(doc: str, rev: int, **fields) -> tuple[bytes, bytes]:
    return doc.encode(), json.dumps({"schema": "doc-edit/v1", "doc_id": doc, "rev": rev,
                                     **fields}).encode()


def ready_status(worker: WorkerProcess) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/ready",
                                    timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def test_a_document_too_large_for_the_budget_is_dead_lettered_and_memory_stays_bounded(
    make_deployment, tmp_path, pep_text, fresh_classify
):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    worker = deployment.worker(args=["--memory-budget-bytes", str(BUDGET),
                                     "--max-document-tokens", "0"]).start()
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic, s.dlq_topic]).start()
    try:
        worker.wait_ready()
        page = worker.scrape()
        limit = int(metric(page, "incstream_max_document_tokens"))
        session_budget = metric(page, "incstream_session_cache_budget_bytes")
        assert metric(page, "incstream_memory_budget_bytes") == BUDGET
        assert 1000 < limit < 8000, limit  # what ~0.4 GiB of exact-mode sessions hold
        big = pep_text(10_000)  # ~1.2 GB of exact-mode session: past the budget if built
        cut = big[: len(pep_text(limit // 3))]
        mids = {f"mid-{i}": pep_text(limit * 2 // 3, offset=i + 1) for i in range(2)}
        small = "A short note: the harbour town is lovely and the acting is warm."
        produce_raw(deployment.broker.bootstrap, s.edits_topic, [
            event("big", 0, snapshot=big),
            event("small", 0, snapshot=small),
            event("big", 1, ops=[{"retain": len(cut)}, {"delete": len(big) - len(cut)}],
                  sha1_after=sha1_hex(cut)),
            *(event(doc, 0, snapshot=text) for doc, text in mids.items()),
        ])
        assert reader.wait_for(lambda: len(reader.of(s.classes_topic)) >= 5, timeout_s=300), \
            reader.of(s.classes_topic)
        peak = peak_resident_bytes(worker.process.pid)
        page = worker.scrape()
    finally:
        reader.stop()
        code, _ = worker.stop()
    assert code == 0

    updates = {(r["doc_id"], r["rev"]): r for r in reader.of(s.classes_topic)}
    # Rev 0 of the large document: applied to the text (right hash) but not classified.
    too_large = updates[("big", 0)]
    assert too_large["sha1"] == sha1_hex(big) and too_large["length_tokens"] == 10_000
    assert too_large["label"] is None and too_large["scores"] is None
    (dead_letter,) = reader.of(s.dlq_topic)
    assert dead_letter["reason"] == "document_too_large"
    assert json.loads(dead_letter["event"])["rev"] == 0 and "10000 tokens" in \
        dead_letter["error"]
    # The text was kept: the edit that cuts it down applies and is classified from it.
    texts = {("big", 1): cut, ("small", 0): small, **{(d, 0): t for d, t in mids.items()}}
    for key, text in texts.items():
        assert updates[key]["sha1"] == sha1_hex(text), key
        assert_same_answer(updates[key], fresh_classify(text), str(key))
    assert metric(page, "incstream_dead_letters_total", reason="document_too_large") == 1
    # The two mid documents do not fit the sessions' budget together: the cache evicted.
    assert metric(page, "incstream_session_cache_evictions_total") >= 1
    assert metric(page, "incstream_session_cache_bytes") <= session_budget
    assert peak is not None and peak < BUDGET, f"peak RSS {peak / GIB:.2f} GiB"


def test_sigterm_during_a_long_build_exits_inside_the_grace_period_and_the_event_is_replayed(
    make_deployment, tmp_path, pep_text, fresh_classify
):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    text = pep_text(8_000)  # an exact-mode build of several seconds, ~1 GB
    data_dir = tmp_path / "worker"
    worker = deployment.worker(data_dir=data_dir).start()
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic, s.dlq_topic]).start()
    try:
        worker.wait_ready()
        ready_rss = resident_bytes(worker.process.pid)
        produce_raw(deployment.broker.bootstrap, s.edits_topic,
                    [event("long", 0, snapshot=text)])
        # The session grows as its chunks are built: a few hundred MB in, the build is on.
        deadline = time.monotonic() + 120
        while resident_bytes(worker.process.pid) < ready_rss + 200 * 1024**2:
            assert time.monotonic() < deadline, "the build did not start"
            assert reader.of(s.classes_topic) == [], "built before the check: make it longer"
            time.sleep(0.05)
        code, seconds = worker.stop(grace_s=GRACE_S)
        assert code == 0, f"exit status {code} after {seconds:.1f} s (SIGKILL at the grace)"
        assert seconds < GRACE_S
        log = (tmp_path / "worker.log").read_text()
        assert "abandoned part way" in log, "the stop waited for the build instead"
        assert reader.of(s.classes_topic) == []

        again = deployment.worker(data_dir=data_dir, name="worker-2").start()
        try:
            assert reader.wait_for(lambda: reader.of(s.classes_topic), timeout_s=120)
        finally:
            again.stop()
    finally:
        reader.stop()
        worker.kill()
    (update,) = reader.of(s.classes_topic)
    assert update["sha1"] == sha1_hex(text)
    assert_same_answer(update, fresh_classify(text), "replayed")
    assert reader.of(s.dlq_topic) == []


def test_a_broker_restart_that_loses_the_topics_makes_the_worker_exit(tmp_path):
    """Its own broker (the session's is shared): stopped, started again on the same port, it
    comes back empty (in-memory storage)."""
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    worker = None
    try:
        settings = Settings(broker=broker.url, app_id="restart")
        ensure_topics(settings)
        worker = WorkerProcess(broker.url, tmp_path / "worker", log_path=tmp_path / "w.log",
                               app_id="restart", extra_args=["--model", "none"],
                               env={"INCSTREAM_BROKER_LOST_EXIT_S": "8",
                                    "INCSTREAM_BROKER_PROBE_INTERVAL_S": "1"}).start()
        worker.wait_ready()
        produce_raw(broker.bootstrap, settings.edits_topic,
                    [event("d", 0, snapshot="before the restart")])
        assert metric(worker.scrape(), "incstream_broker_unreachable_seconds") == 0
        broker.stop()
        broker.start()  # same port, no topics
        seen_not_ready = seen_counting = False
        deadline = time.monotonic() + 120
        while worker.alive() and time.monotonic() < deadline:
            seen_not_ready |= ready_status(worker) == 503
            with contextlib.suppress(OSError):  # it may be exiting
                seen_counting |= metric(worker.scrape(timeout_s=2),
                                        "incstream_broker_unreachable_seconds") > 0
            time.sleep(0.3)
        code = worker.wait_exit(timeout_s=30)
        assert code == EXIT_BROKER_LOST, f"exit status {code}"
        assert seen_not_ready and seen_counting
        assert "lacks this worker's topics" in (tmp_path / "w.log").read_text()
    finally:
        if worker is not None:
            worker.kill()
        broker.stop()
