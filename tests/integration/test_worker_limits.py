"""A worker with small limits, set through its settings: a hot-cache budget that holds one
session, two held events per document, a tiny state size, and offsets never committed
(commit interval of an hour). Each limit must take effect, through the real worker.

Events go in one at a time (`send` waits for its outcome), so the order the worker sees them
in is the order written here, and each test passes alone as well.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
from answers import assert_same_answer
from kafka_tools import committed_offsets, produce_raw, read_all
from prom import metric, metric_by, wait_metric

from incstream.engine.incremental.text_ops import sha1_hex
from incstream.engine.model.model_bundle import DEFAULT_MODEL
from incstream.pipeline.topic_reader import TopicReader
from incstream.state.document import DocumentState, encode_state

pytestmark = pytest.mark.integration

MAX_HELD = 2
MAX_STATE_BYTES = 1500
MODEL = DEFAULT_MODEL  # what fresh_classify builds

# Two documents of about the same size, edited in turn: with room for one session, each edit
# finds the other document's session in the cache, evicts it and rebuilds its own.
EVICT = {
    "evict-a": ["The film opens on a quiet harbour town where nothing much happens, and the "
                "acting is wooden.",
                "The film opens on a quiet harbour town where nothing much happens, and the "
                "acting is wooden and dull.",
                "The film opens on a lovely harbour town where nothing much happens, and the "
                "acting is wooden and dull.",
                "The film opens on a lovely harbour town where nothing much happens, and the "
                "acting is warm and funny.",
                "The film opens on a lovely harbour town where a lot happens, and the acting "
                "is warm and funny."],
    "evict-b": ["A small cafe by the station serves coffee to travellers every morning, and "
                "the staff are rude.",
                "A small cafe by the station serves excellent coffee to travellers every "
                "morning, and the staff are rude.",
                "A small cafe by the station serves excellent coffee to travellers every "
                "morning, and the staff are kind.",
                "A small cafe by the station serves bitter coffee to travellers every "
                "morning, and the staff are kind."],
}


def raw(**fields) -> bytes:
    """An event as some producer formats it (spaced JSON, \\u escapes, an extra field)."""
    body = {"note": "sent as is: café", "schema": "doc-edit/v1", **fields}
    return (json.dumps(body, ensure_ascii=True, separators=(", ", ": ")) + "\n").encode()


def append(doc: str, rev: int, old: str, new: str) -> bytes:
    assert new.startswith(old)
    return raw(doc_id=doc, rev=rev, ops=[{"retain": len(old)}, {"insert": new[len(old):]}])


def replace(doc: str, rev: int, old: str, new: str) -> bytes:
    head = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
                min(len(old), len(new)))
    tail = next((i for i in range(min(len(old), len(new)) - head)
                 if old[-1 - i] != new[-1 - i]), min(len(old), len(new)) - head)
    return raw(doc_id=doc, rev=rev, ops=[{"retain": head}, {"delete": len(old) - head - tail},
                                         {"insert": new[head:len(new) - tail]}],
               sha1_after=sha1_hex(new))


@pytest.fixture(scope="module")
def session_bytes(fresh_session) -> Callable[[str], int]:
    return lambda text: fresh_session(text).nbytes()


@pytest.fixture(scope="module")
def cache_budget(session_bytes) -> int:
    sizes = [session_bytes(text) for texts in EVICT.values() for text in texts]
    budget = max(sizes) * 3 // 2
    assert max(sizes) < budget < 2 * min(sizes), "the budget must hold one session, not two"
    return budget


@pytest.fixture(scope="module")
def worker(deployment, cache_budget):
    worker = deployment.worker(
        env={"INCSTREAM_MAX_STATE_BYTES": str(MAX_STATE_BYTES),
             "INCSTREAM_COMMIT_INTERVAL_S": "3600"},
        args=["--max-held-per-doc", str(MAX_HELD)],
        session_cache_bytes=cache_budget,
    ).start()
    worker.wait_ready()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def send(deployment, worker, reader) -> Callable[..., None]:
    """send(doc, event bytes, updates=n, dead_letters=m): produce it (one record per batch,
    so tansu's high-water marks are right) and wait until the worker has consumed it and
    published what it should."""
    s = deployment.settings

    def events_consumed() -> float:
        return sum(metric_by(worker.scrape(), "incstream_events_total", "outcome").values())

    def send(doc: str, value: bytes, updates: int = 1, dead_letters: int = 0) -> None:
        before = (events_consumed(), len(reader.of(s.classes_topic)),
                  len(reader.of(s.dlq_topic)))
        produce_raw(deployment.broker.bootstrap, s.edits_topic, [(doc.encode(), value)])
        assert reader.wait_for(
            lambda: (events_consumed() >= before[0] + 1
                     and len(reader.of(s.classes_topic)) >= before[1] + updates
                     and len(reader.of(s.dlq_topic)) >= before[2] + dead_letters),
            timeout_s=120), f"no outcome for {value[:80]!r}"

    return send


def updates_of(reader: TopicReader, topic: str, doc: str) -> list[dict]:
    return [r for r in reader.of(topic) if r["doc_id"] == doc]


def dead_letters_of(reader: TopicReader, topic: str, doc: str) -> list[dict]:
    records = reader.of(topic)
    parsed = [r for r in records if not isinstance(r["event"], str)]
    assert parsed == [], "dead letters must carry the event as it arrived, not as parsed"
    return [r for r in records if json.loads(r["event"])["doc_id"] == doc]


def test_evicted_sessions_are_rebuilt_from_the_text_with_the_same_answer(
    deployment, worker, reader, send, fresh_classify, session_bytes, cache_budget
):
    s = deployment.settings
    page = worker.scrape()
    before = {name: metric(page, name) for name in (
        "incstream_session_cache_hits_total", "incstream_session_cache_misses_total",
        "incstream_session_cache_evictions_total")}
    a, b = EVICT["evict-a"], EVICT["evict-b"]
    sequence = [("evict-a", 0), ("evict-b", 0), ("evict-a", 1), ("evict-b", 1),
                ("evict-a", 2), ("evict-b", 2), ("evict-a", 3), ("evict-b", 3),
                ("evict-a", 4)]
    for doc, rev in sequence:
        texts = EVICT[doc]
        value = (raw(doc_id=doc, rev=0, snapshot=texts[0]) if rev == 0
                 else replace(doc, rev, texts[rev - 1], texts[rev]))
        send(doc, value)
    # Rev 4 of evict-a followed rev 3 of evict-a: its session was still there, a hit.
    sequence.append(("evict-a", 5))
    five = a[4] + " I loved it."
    send("evict-a", append("evict-a", 5, a[4], five))

    expected_cache = ["miss"] * 9 + ["hit"]
    records = {(r["doc_id"], r["rev"]): r for r in reader.of(s.classes_topic)
               if r["doc_id"] in EVICT}
    texts = {("evict-a", rev): text for rev, text in enumerate([*a, five])}
    texts.update({("evict-b", rev): text for rev, text in enumerate(b)})
    assert [records[key]["cost"]["cache"] for key in sequence] == expected_cache
    for key in sequence:
        assert records[key]["sha1"] == sha1_hex(texts[key])
        assert_same_answer(records[key], fresh_classify(texts[key]), f"{key}")

    page = worker.scrape()
    assert metric(page, "incstream_session_cache_misses_total") - before[
        "incstream_session_cache_misses_total"] == 9
    assert metric(page, "incstream_session_cache_hits_total") - before[
        "incstream_session_cache_hits_total"] == 1
    # Every put but the first and the hit's (same document) evicted the other session.
    assert metric(page, "incstream_session_cache_evictions_total") - before[
        "incstream_session_cache_evictions_total"] == 8
    assert metric(page, "incstream_session_cache_budget_bytes") == cache_budget
    assert metric(page, "incstream_session_cache_sessions") == 1
    assert metric(page, "incstream_session_cache_bytes") == session_bytes(five)


def test_the_max_held_per_doc_setting_bounds_a_gap(deployment, worker, reader, send,
                                                    fresh_classify):
    s = deployment.settings
    doc = "held-doc"
    texts = ["held: a", "held: ab", "held: abc", "held: abcd", "held: abcde"]
    events = [raw(doc_id=doc, rev=0, snapshot=texts[0])] + [
        append(doc, rev, texts[rev - 1], texts[rev]) for rev in range(1, len(texts))]
    page = worker.scrape()
    gaps = metric(page, "incstream_events_total", outcome="gap")
    send(doc, events[0])
    send(doc, events[2], updates=0)
    send(doc, events[3], updates=0)
    assert wait_metric(worker, "incstream_held_events", MAX_HELD) == MAX_HELD
    # A third event past the gap: over the setting (the default would hold 256).
    send(doc, events[4], updates=0, dead_letters=1)
    (overflow,) = dead_letters_of(reader, s.dlq_topic, doc)
    assert overflow["reason"] == "gap_overflow"
    assert overflow["event"] == events[4].decode()
    assert f"{MAX_HELD} events are already held" in overflow["error"]
    page = worker.scrape()
    assert metric(page, "incstream_held_events") == MAX_HELD
    assert metric(page, "incstream_events_total", outcome="gap") - gaps == MAX_HELD
    assert metric(page, "incstream_dead_letters_total", reason="gap_overflow") == 1
    # The missing revision releases the held ones; the dead-lettered one can be sent again.
    send(doc, events[1], updates=3)
    assert wait_metric(worker, "incstream_held_events", 0) == 0
    send(doc, events[4])
    records = updates_of(reader, s.classes_topic, doc)
    assert [r["rev"] for r in records] == [0, 1, 2, 3, 4]
    for record in records:
        assert_same_answer(record, fresh_classify(texts[record["rev"]]),
                           f"rev {record['rev']}")


def test_a_state_over_max_state_bytes_is_dead_lettered_and_the_document_goes_on(
    deployment, worker, reader, send, fresh_classify
):
    s = deployment.settings
    doc = "big-doc"
    rng = random.Random(13)
    big = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
                   for _ in range(600))
    small = "A short review: the plot is thin but the songs are wonderful."
    too_large = len(encode_state(DocumentState(doc_id=doc, rev=0, text=big)))
    fits = len(encode_state(DocumentState(doc_id=doc, rev=1, text=small, model_id=MODEL,
                                          tokens=len(small), label="negative")))
    assert fits < MAX_STATE_BYTES < too_large
    first = raw(doc_id=doc, rev=0, snapshot=big)
    send(doc, first, updates=0, dead_letters=1)
    (dead,) = dead_letters_of(reader, s.dlq_topic, doc)
    assert dead["reason"] == "state_too_large" and dead["event"] == first.decode()
    assert f"{MAX_STATE_BYTES}-byte" in dead["error"]
    assert updates_of(reader, s.classes_topic, doc) == []
    send(doc, raw(doc_id=doc, rev=1, snapshot=small))
    (record,) = updates_of(reader, s.classes_topic, doc)
    assert record["rev"] == 1 and record["sha1"] == sha1_hex(small)
    assert_same_answer(record, fresh_classify(small), "rev 1")
    assert metric(worker.scrape(), "incstream_dead_letters_total",
                  reason="state_too_large") == 1


def test_lag_counts_from_the_committed_offset(deployment, worker, reader, send):
    """Nothing is ever committed here (commit interval: an hour), so every event this worker
    consumed is still lag: a partition's lag is all of its events."""
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    for i in range(3):
        send(f"lag-doc-{i}", raw(doc_id=f"lag-doc-{i}", rev=0, snapshot=f"Lag {i}."))
    assert committed_offsets(bootstrap, s.app_id, s.edits_topic) == {}
    per_partition = Counter(r.partition for r in read_all(bootstrap, s.edits_topic))
    expected = {str(p): per_partition.get(p, 0) for p in range(s.partitions)}
    assert sum(expected.values()) >= 3
    lag: dict = {}
    deadline = time.monotonic() + 15  # sampled every 5 s
    while time.monotonic() < deadline:
        lag = metric_by(worker.scrape(), "incstream_consumer_lag_messages", "partition")
        if lag == expected:
            break
        time.sleep(0.5)
    assert lag == expected
