"""A real broker, a real worker process with the default model: replay real edits, feed it
every kind of bad input, scrape its metrics.

Before the module's worker starts, a worker running ANOTHER model bundle creates two documents
and stops; then one of them is overwritten in the table's changelog with bytes that are not a
state. The module's worker restores both from the changelog (its data dir is empty), so it
meets a state another model wrote and a state it cannot read (dead-lettered once, resynced by
the document's next snapshot). It runs with the
INCSTREAM_TEST_FAIL_BEFORE_PUBLISH hook armed for one document (an internal error after
classification, before anything is published). Every test asks for the fixtures that produce
what it checks, so each one also passes when run alone.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from answers import assert_same_answer
from kafka_tools import latest_values, produce_raw, read_all
from prom import metric, metric_by, samples, wait_metric

from incstream.engine.incremental.text_ops import apply_ops, sha1_hex
from incstream.engine.model.base_model import load_tokenizer
from incstream.engine.model.model_bundle import DEFAULT_MODEL
from incstream.pipeline.memory_budget import HEAP_OVERHEAD
from incstream.pipeline.producer import read_events, replay
from incstream.pipeline.records import DEAD_LETTER_REASONS
from incstream.pipeline.stream_files import select_events
from incstream.pipeline.topic_reader import TopicReader
from incstream.pipeline.topics import changelog_topic
from incstream.state.document import decode_state

pytestmark = pytest.mark.integration

# The default hot-cache budget holds the whole stream (~440 MB of sessions at most). A budget
# below the working set thrashes: Faust interleaves its partitions event by event, so with
# room for ~2 of these 4 documents only a quarter of the revisions were cache hits.
CACHE_BYTES = 2 * 1024**3
MODEL = DEFAULT_MODEL  # what fresh_classify builds
OTHER_MODEL = "news-outlets-minilm-vq64"  # a real bundle with other labels

UNREADABLE_DOC = "unreadable-doc"
OTHER_MODEL_DOC = "other-model-doc"
INTERNAL_ERROR_DOC = "internal-error-doc"
OTHER_MODEL_TEXT = "The service at the harbour restaurant was slow"
GARBAGE_STATE = b"ISD\x01 not zlib, not a state"


def raw(**fields) -> bytes:
    """An event as some producer formats it: spaced JSON, \\u escapes, a trailing newline and a
    field the worker ignores. Re-serializing the parsed event can never give these bytes back,
    so a dead letter carrying them proves it carries the event as it arrived."""
    body = {"note": "sent as is: café", **fields}
    return (json.dumps(body, ensure_ascii=True, separators=(", ", ": ")) + "\n").encode()


def edit(doc: str, rev: int, **fields) -> bytes:
    return raw(schema="doc-edit/v1", doc_id=doc, rev=rev, **fields)


@dataclass
class Before:
    """What was in the topics before the module's worker started."""

    changelog: dict[int, int]  # next offset of each changelog partition that had records
    other_label: str  # the other model's label of OTHER_MODEL_DOC


@pytest.fixture(scope="module")
def before(deployment) -> Before:
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    reader = TopicReader(bootstrap, [s.classes_topic]).start()
    worker = deployment.worker(name="other-model", model=OTHER_MODEL).start()
    try:
        worker.wait_ready()
        produce_raw(bootstrap, s.edits_topic, [
            (OTHER_MODEL_DOC.encode(), edit(OTHER_MODEL_DOC, 0, snapshot=OTHER_MODEL_TEXT)),
            (UNREADABLE_DOC.encode(), edit(UNREADABLE_DOC, 0, snapshot="soon unreadable")),
        ])
        assert reader.wait_for(lambda: len(reader.of(s.classes_topic)) >= 2, timeout_s=120)
        code, _ = worker.stop()
        assert code == 0
    finally:
        reader.stop()
        worker.kill()
    (other,) = [r for r in reader.of(s.classes_topic) if r["doc_id"] == OTHER_MODEL_DOC]
    assert other["model"] == OTHER_MODEL
    produce_raw(bootstrap, changelog_topic(s), [(UNREADABLE_DOC.encode(), GARBAGE_STATE)])
    changelog: dict[int, int] = {}
    for record in read_all(bootstrap, changelog_topic(s)):
        changelog[record.partition] = max(changelog.get(record.partition, 0), record.offset + 1)
    return Before(changelog=changelog, other_label=other["label"])


@pytest.fixture(scope="module")
def running_worker(deployment, before):
    worker = deployment.worker(
        env={"INCSTREAM_TEST_FAIL_BEFORE_PUBLISH": f"{INTERNAL_ERROR_DOC}:1"}).start()
    worker.wait_ready()
    yield worker
    if worker.alive():
        worker.stop()


@pytest.fixture(scope="module")
def reader(deployment):
    s = deployment.settings
    reader = MainWorkerReader(deployment.broker.bootstrap,
                              [s.classes_topic, s.dlq_topic]).start()
    yield reader
    reader.stop()


class MainWorkerReader(TopicReader):
    """The output topics, less the other-model worker's two updates."""

    def of(self, topic: str) -> list[dict]:
        return [r for r in super().of(topic) if r.get("model") != OTHER_MODEL]


@dataclass
class Replayed:
    events: list[dict]
    texts: dict[tuple[str, int], str]  # (doc_id, rev) -> text after that revision
    updates: list[dict]


@pytest.fixture(scope="module")
def demo_replayed(deployment, running_worker, reader, demo_stream) -> Replayed:
    """The bundled real edit stream, replayed once and answered in full."""
    s = deployment.settings
    events = select_events(read_events(demo_stream))
    expected = {(e["doc_id"], e["rev"]) for e in events}
    assert len(expected) == len(events) > 100
    replay(events, deployment.broker.bootstrap, s.edits_topic, progress=False)

    def answered() -> bool:
        return {(r["doc_id"], r["rev"]) for r in reader.of(s.classes_topic)} >= expected

    assert reader.wait_for(answered, timeout_s=240), "not every revision was answered"
    texts, current = {}, {}
    for event in events:
        doc = event["doc_id"]
        current[doc] = (event["snapshot"] if "snapshot" in event
                        else apply_ops(current[doc], event["ops"])[0])
        texts[(doc, event["rev"])] = current[doc]
    updates = [r for r in reader.of(s.classes_topic) if (r["doc_id"], r["rev"]) in expected]
    return Replayed(events, texts, updates)


def test_every_revision_of_a_real_stream_is_answered_once_with_the_right_hash_and_label(
    demo_replayed, fresh_classify
):
    events, texts, updates = demo_replayed.events, demo_replayed.texts, demo_replayed.updates
    counts = Counter((r["doc_id"], r["rev"]) for r in updates)
    assert len(counts) == len(events) and max(counts.values()) == 1, \
        "a revision was answered twice without any crash"
    # The token count the worker keeps equals tokenizing the whole text; the hash is the
    # producer's.
    tokenizer = load_tokenizer()
    sha1s = {(e["doc_id"], e["rev"]): e.get("sha1_after") for e in events}
    for record in updates:
        key = (record["doc_id"], record["rev"])
        assert record["schema"] == "doc-class/v1"
        assert record["sha1"] == sha1_hex(texts[key]), record
        if sha1s[key]:
            assert record["sha1"] == sha1s[key]
        assert record["length_chars"] == len(texts[key])
        assert record["length_tokens"] == len(
            tokenizer(texts[key], add_special_tokens=False)["input_ids"])
    # Outputs of a document arrive in revision order (one partition per document).
    by_doc: dict[str, list[dict]] = {}
    for record in updates:
        by_doc.setdefault(record["doc_id"], []).append(record)
    for recs in by_doc.values():
        assert [r["rev"] for r in recs] == sorted(r["rev"] for r in recs)

    # Every update carries the model's answer and what it cost.
    labels = set(fresh_classify("x").scores)
    for record in updates:
        assert record["label"] in labels and set(record["scores"]) == labels, record
        assert abs(sum(record["scores"].values()) - 1) < 1e-6
        assert record["model"] == MODEL
        cost = record["cost"]
        assert cost["cache"] == ("miss" if record["snapshot"] else "hit"), record
        assert cost["macs_dense_equivalent"] > 0 and cost["macs_incremental"] >= 0
        if cost["cache"] != "hit":  # a fresh build recomputes every row of every layer
            assert cost["positions_recomputed"] >= 6 * (record["length_tokens"] + 2)
    # label_changed says whether the label differs from the previous revision's.
    for recs in by_doc.values():
        previous = None
        for record in recs:
            assert record["label_changed"] == (previous is not None
                                               and record["label"] != previous), record
            previous = record["label"]
    # Each document's last answer equals classifying its final text from scratch.
    for doc, recs in by_doc.items():
        assert_same_answer(recs[-1], fresh_classify(texts[(doc, recs[-1]["rev"])]),
                           f"{doc} r{recs[-1]['rev']}")


@dataclass
class BadInput:
    dead_letters: Counter  # (reason, event as the DLQ must carry it) -> how many
    dlq_outcomes: int  # events whose own outcome is dlq
    answers: dict[str, list[tuple[int, str]]]  # doc -> [(rev, text)] it must be answered with
    sent: int  # events
    unpublished: tuple[str, list[dict]]  # the classification the internal error threw away:
    #                                      (text before, ops), a cache hit


@pytest.fixture(scope="module")
def bad_input(deployment, running_worker, reader) -> BadInput:
    """Every dead-letter reason the worker can give without special settings (gap_overflow and
    state_too_large: test_worker_limits), gaps, duplicates, an injected internal error, a
    state it cannot read, a state another model wrote; sent once, waited for."""
    s = deployment.settings
    doc = "bad-input-doc"
    text0 = "The quick brown fox"
    text1 = text0 + " jumps"
    text2 = text1 + " over"
    text3 = text2 + " the dog."
    jumps = [{"retain": len(text0)}, {"insert": " jumps"}]
    sent: list[tuple[str, bytes]] = []
    dead: list[tuple[str, bytes | str]] = []

    def send(value: bytes, reason: str | None = None, key: str = doc) -> None:
        sent.append((key, value))
        if reason:
            dead.append((reason, value))

    send(edit(doc, 0, snapshot=text0))
    send(b"{this is not json", "invalid_json")
    send(b'{"schema": "doc-edit/v1", \xff\xfe not UTF-8', "invalid_json")
    send(raw(schema="doc-edit/v9", doc_id=doc, rev=1, ops=[]), "unknown_schema")
    send(edit(doc, 1, ops=jumps, base_rev="zero"), "invalid_event")
    send(edit(doc, 1, ops=[{"retain": 1, "insert": "x"}]), "invalid_ops")
    send(edit(doc, 1, ops=[{"retain": 500}]), "ops_past_end")
    send(edit(doc, 1, ops=jumps, len_after=3), "length_mismatch")
    send(edit(doc, 1, ops=jumps, sha1_after="0" * 40), "checksum_mismatch")
    send(edit(doc, 1, ops=jumps, base_rev=7), "base_rev_mismatch")
    send(edit("someone-else", 0, snapshot="x"), "key_mismatch")
    send(edit(doc, 1, ops=jumps, base_rev=0, sha1_after=sha1_hex(text1)))
    # A gap: rev 3 arrives before rev 2, and must wait for it.
    send(edit(doc, 3, ops=[{"retain": len(text2)}, {"insert": " the dog."}],
              sha1_after=sha1_hex(text3)))
    send(edit(doc, 2, ops=[{"retain": len(text1)}, {"insert": " over"}], len_after=len(text2)))
    # Duplicates (at-least-once producer retries), one of them of a revision that was held.
    send(edit(doc, 1, ops=jumps))
    send(edit(doc, 3, ops=[{"retain": 1}]))

    # A held event that turns out bad once its gap fills: dead-lettered as it arrived.
    held_doc = "held-bad-doc"
    held_bad = edit(held_doc, 2, ops=[{"retain": 500}])
    send(edit(held_doc, 0, snapshot="ab"), key=held_doc)
    send(held_bad, key=held_doc)
    send(edit(held_doc, 1, ops=[{"retain": 2}, {"insert": "c"}]), key=held_doc)
    dead.append(("ops_past_end", held_bad))

    # The worker raises once on rev 1 of this document, after classifying it and before
    # publishing anything: rev 1 goes to the DLQ, the document stays at rev 0, and the
    # producer's retry of rev 1 is applied (from a rebuilt session: the cached one had
    # already moved to rev 1).
    err0, err1, err2 = "Hello there", "Hello there, general", "Hello there, general Kenobi"
    send(edit(INTERNAL_ERROR_DOC, 0, snapshot=err0), key=INTERNAL_ERROR_DOC)
    err_ops = [{"retain": len(err0)}, {"insert": ", general"}]
    err_rev1 = edit(INTERNAL_ERROR_DOC, 1, ops=err_ops)
    send(err_rev1, "internal_error", key=INTERNAL_ERROR_DOC)
    send(err_rev1, key=INTERNAL_ERROR_DOC)
    send(edit(INTERNAL_ERROR_DOC, 2, ops=[{"retain": len(err1)}, {"insert": " Kenobi"}]),
         key=INTERNAL_ERROR_DOC)

    # The stored state of this document is not a state: the first event that meets it is
    # dead-lettered, the document is reset to wait for a snapshot, and its next snapshot
    # (whatever its revision) brings it back. (An edit in between: test_worker_hostile.)
    send(edit(UNREADABLE_DOC, 1, ops=[{"insert": "x"}]), "state_unreadable", key=UNREADABLE_DOC)
    resynced = "The soup was back, and warm this time"
    send(edit(UNREADABLE_DOC, 5, snapshot=resynced), key=UNREADABLE_DOC)
    send(edit(UNREADABLE_DOC, 6, ops=[{"retain": len(resynced)}, {"insert": "."}]),
         key=UNREADABLE_DOC)

    # The stored state was written by another model (a news-outlet label): rev 1's
    # label_changed must not be computed against it.
    om1 = OTHER_MODEL_TEXT + ", and the soup was cold and bland."
    om2 = om1 + " Still, the view of the sea made up for it; we loved the evening."
    send(edit(OTHER_MODEL_DOC, 1, ops=[{"retain": len(OTHER_MODEL_TEXT)},
                                       {"insert": om1[len(OTHER_MODEL_TEXT):]}]),
         key=OTHER_MODEL_DOC)
    send(edit(OTHER_MODEL_DOC, 2, ops=[{"retain": len(om1)}, {"insert": om2[len(om1):]}]),
         key=OTHER_MODEL_DOC)

    produce_raw(deployment.broker.bootstrap, s.edits_topic,
                [(key.encode(), value) for key, value in sent])
    result = BadInput(
        dead_letters=Counter((reason, value.decode("utf-8", "replace"))
                             for reason, value in dead),
        dlq_outcomes=len(dead) - 1,  # the held one was dead-lettered by rev 1's event (ok)
        answers={doc: [(0, text0), (1, text1), (2, text2), (3, text3)],
                 held_doc: [(0, "ab"), (1, "abc")],
                 INTERNAL_ERROR_DOC: [(0, err0), (1, err1), (2, err2)],
                 OTHER_MODEL_DOC: [(1, om1), (2, om2)],
                 UNREADABLE_DOC: [(5, resynced), (6, resynced + ".")]},
        sent=len(sent),
        unpublished=(err0, err_ops),
    )

    def done() -> bool:
        answered = {(r["doc_id"], r["rev"]) for r in reader.of(s.classes_topic)}
        return (sum(result.dead_letters.values()) <= len(reader.of(s.dlq_topic))
                and all((d, rev) in answered for d, revs in result.answers.items()
                        for rev, _ in revs))

    assert reader.wait_for(done, timeout_s=120), "bad input: not everything came back"
    return result


def test_bad_input_goes_to_the_dlq_as_it_arrived_and_documents_stay_correct(
    deployment, running_worker, reader, bad_input, fresh_classify
):
    s = deployment.settings
    dlq = reader.of(s.dlq_topic)
    assert len(dlq) == sum(bad_input.dead_letters.values()) == 13
    # Every dead-letter reason, each with the event exactly as it was sent.
    parsed = [r for r in dlq if not isinstance(r["event"], str)]
    assert parsed == [], "dead letters must carry the event as it arrived, not as parsed"
    assert Counter((r["reason"], r["event"]) for r in dlq) == bad_input.dead_letters
    assert {reason for reason, _ in bad_input.dead_letters} == {
        "invalid_json", "unknown_schema", "invalid_event", "invalid_ops", "ops_past_end",
        "length_mismatch", "checksum_mismatch", "base_rev_mismatch", "key_mismatch",
        "internal_error", "state_unreadable"}
    for record in dlq:
        assert record["schema"] == "doc-edit-dlq/v1" and record["error"], record
    not_utf8 = [r for r in dlq if "event_base64" in r]
    assert [base64.b64decode(r["event_base64"]) for r in not_utf8] == [
        b'{"schema": "doc-edit/v1", \xff\xfe not UTF-8']

    # The documents: each revision answered once, in order, equal to a fresh classification.
    for doc, revisions in bad_input.answers.items():
        records = [r for r in reader.of(s.classes_topic) if r["doc_id"] == doc]
        assert [(r["rev"], r["sha1"]) for r in records] == [
            (rev, sha1_hex(text)) for rev, text in revisions], doc
        for record, (_, text) in zip(records, revisions, strict=True):
            assert_same_answer(record, fresh_classify(text), f"{doc} rev {record['rev']}")
    # rev 2 filled the gap and released rev 3 within one event, both classified.
    internal = [r for r in reader.of(s.classes_topic) if r["doc_id"] == INTERNAL_ERROR_DOC]
    assert [r["cost"]["cache"] for r in internal] == ["miss", "rebuild", "hit"]
    assert running_worker.alive()

    page = running_worker.scrape()
    reasons = Counter(reason for reason, _ in bad_input.dead_letters.elements())
    by_reason = metric_by(page, "incstream_dead_letters_total", "reason")
    assert set(by_reason) == set(DEAD_LETTER_REASONS)  # each exported from the start
    assert {reason: n for reason, n in by_reason.items() if n} == reasons
    assert metric(page, "incstream_events_total", outcome="dlq") == bad_input.dlq_outcomes
    assert metric(page, "incstream_events_total", outcome="duplicate") == 2
    assert metric(page, "incstream_events_total", outcome="gap") == 2
    assert metric(page, "incstream_session_rebuilds_total", reason="stale") == 1
    assert metric(page, "incstream_session_rebuilds_total", reason="text_mismatch") == 0
    assert metric(page, "incstream_session_rebuilds_total", reason="error") == 0


def test_a_state_written_by_another_model_does_not_count_as_a_label_change(
    deployment, before, reader, bad_input, fresh_classify
):
    s = deployment.settings
    om1, om2 = (text for _, text in bad_input.answers[OTHER_MODEL_DOC])
    rev1, rev2 = [r for r in reader.of(s.classes_topic) if r["doc_id"] == OTHER_MODEL_DOC]
    label1, label2 = fresh_classify(om1).label, fresh_classify(om2).label
    assert rev1["label"] == label1 != before.other_label
    assert rev1["label_changed"] is False, "compared with another model's label"
    assert rev2["label_changed"] == (label2 != label1)
    # The stored label (and model id) now are this model's.
    state = decode_state(latest_values(deployment.broker.bootstrap,
                                       changelog_topic(s))[OTHER_MODEL_DOC.encode()])
    assert (state.rev, state.model_id, state.label) == (2, MODEL, label2)


def test_metrics_account_for_everything_the_worker_did(
    deployment, before, running_worker, reader, demo_replayed, bad_input, fresh_session
):
    """Every incstream_* metric, scraped over HTTP, against what the topics say happened."""
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    consumed = len(demo_replayed.events) + bad_input.sent
    events_total = 0.0
    for _ in range(30):  # the counters move just after the last publish
        page = running_worker.scrape()
        events_total = sum(samples(page, "incstream_events_total").values())
        if events_total == consumed:
            break
        time.sleep(0.5)
    assert events_total == consumed
    assert metric(page, "incstream_processing_seconds_count") == consumed

    updates = reader.of(s.classes_topic)
    dlq = reader.of(s.dlq_topic)
    assert metric(page, "incstream_outputs_total") == len(updates)
    assert metric(page, "incstream_end_to_end_seconds_count") == len(updates)
    assert metric(page, "incstream_label_changes_total") == sum(r["label_changed"]
                                                               for r in updates)
    assert sum(metric_by(page, "incstream_dead_letters_total", "reason").values()) == len(dlq)
    # What the classifier did: every published answer's cost, plus the one classification the
    # injected internal error threw away (a cache hit, redone here the same way).
    text_before, ops = bad_input.unpublished
    session = fresh_session(text_before)
    with torch.no_grad():
        report = session.apply_change(*apply_ops(text_before, ops))
    lost_macs = int(report.macs["total"])
    lost_positions = sum(sum(u.rows_changed) for u in report.chunk_updates)
    lost_dense = next(r["cost"]["macs_dense_equivalent"] for r in updates
                      if (r["doc_id"], r["rev"]) == (INTERNAL_ERROR_DOC, 1))
    caches = Counter(r["cost"]["cache"] for r in updates)
    assert metric(page, "incstream_session_cache_hits_total") == caches["hit"] + 1
    assert caches["hit"] > len(updates) / 2
    assert metric(page, "incstream_session_cache_misses_total") == caches["miss"]
    assert sum(metric_by(page, "incstream_session_rebuilds_total", "reason").values()) == \
        caches["rebuild"] == 1
    hit = [r for r in updates if r["cost"]["cache"] == "hit"]
    fresh = [r for r in updates if r["cost"]["cache"] != "hit"]
    incremental_macs = metric(page, "incstream_inference_macs_total", path="incremental")
    fresh_macs = metric(page, "incstream_inference_macs_total", path="fresh")
    dense = metric(page, "incstream_dense_equivalent_macs_total")
    assert incremental_macs == sum(r["cost"]["macs_incremental"] for r in hit) + lost_macs
    assert fresh_macs == sum(r["cost"]["macs_incremental"] for r in fresh) > 0
    assert dense == sum(r["cost"]["macs_dense_equivalent"] for r in updates) + lost_dense
    assert dense > incremental_macs + fresh_macs, "reusing sessions should save MACs overall"
    assert metric(page, "incstream_positions_recomputed_total", path="incremental") == sum(
        r["cost"]["positions_recomputed"] for r in hit) + lost_positions
    assert metric(page, "incstream_positions_recomputed_total", path="fresh") == sum(
        r["cost"]["positions_recomputed"] for r in fresh)
    assert metric(page, "incstream_inference_seconds_count") == len(updates) + 1
    assert metric(page, "incstream_inference_batch_size_sum") == len(updates) + 1
    assert metric(page, "incstream_model_info", model=MODEL) == 1

    # The hot cache holds one session per classified document (the budget holds them all),
    # each as large as a fresh build of the document's last text.
    last_text: dict[str, str] = {}
    for (doc, _), text in sorted(demo_replayed.texts.items()):
        last_text[doc] = text
    for doc, revisions in bad_input.answers.items():
        last_text[doc] = revisions[-1][1]
    assert {r["doc_id"] for r in updates} == set(last_text)
    assert metric(page, "incstream_session_cache_sessions") == len(last_text)
    assert metric(page, "incstream_session_cache_evictions_total") == 0
    # The default memory budget (3 GiB) leaves the sessions' tensors what is left over the
    # model's measured start (0.5-1 GiB) and the 512 MiB reserve, over the heap's overhead.
    budget = metric(page, "incstream_session_cache_budget_bytes")

    def room(start: int) -> float:
        return (3 * 1024**3 - start - 512 * 1024**2) / HEAP_OVERHEAD

    assert room(1024**3) < budget < room(512 * 1024**2) < CACHE_BYTES
    assert metric(page, "incstream_memory_budget_bytes") == 3 * 1024**3
    assert metric(page, "incstream_session_cache_bytes") == sum(
        fresh_session(text).nbytes() for text in last_text.values())

    # The table, as its changelog tells it (what this worker wrote: after `before`'s end).
    written = [r for r in read_all(bootstrap, changelog_topic(s))
               if r.offset >= before.changelog.get(r.partition, 0)]
    table = latest_values(bootstrap, changelog_topic(s))
    assert metric(page, "incstream_state_record_bytes_count") == len(written) >= len(updates) / 2
    assert metric(page, "incstream_state_record_bytes_sum") == sum(len(r.value)
                                                                    for r in written)
    assert set(table) == {d.encode() for d in last_text} | {UNREADABLE_DOC.encode()}
    assert wait_metric(running_worker, "incstream_documents", len(table)) == len(table)
    assert wait_metric(running_worker, "incstream_state_bytes",
                       sum(len(v) for v in table.values())) == sum(len(v)
                                                                   for v in table.values())
    assert metric(page, "incstream_held_events") == 0
    # Lag: every partition's committed offset has caught up with its high-water mark.
    for _ in range(30):
        lag = metric_by(running_worker.scrape(), "incstream_consumer_lag_messages", "partition")
        if lag == {str(p): 0 for p in range(s.partitions)}:
            break
        time.sleep(0.5)
    assert lag == {str(p): 0 for p in range(s.partitions)}


def test_sigterm_stops_the_worker_cleanly_within_30_seconds(running_worker):
    code, seconds = running_worker.stop(grace_s=40)
    assert code == 0, f"exit code {code}"
    assert seconds < 30, f"took {seconds:.1f} s to stop"
