"""A real broker, a real worker process: replay real edits, feed it garbage, scrape metrics."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from engine.base_model import load_tokenizer
from engine.text_ops import apply_ops, sha1_hex
from pipeline.demo import metric_value
from pipeline.producer import edit_producer, read_events, replay
from pipeline.stream_files import select_events
from pipeline.topic_reader import TopicReader

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(make_deployment, tmp_path_factory):
    return make_deployment(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def running_worker(deployment):
    worker = deployment.worker().start()
    worker.wait_serving()
    yield worker
    if worker.alive():
        worker.stop()


@pytest.fixture(scope="module")
def reader(deployment):
    s = deployment.settings
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic, s.dlq_topic]).start()
    yield reader
    reader.stop()


def test_every_revision_of_a_real_stream_is_answered_once_with_the_right_hash(
    deployment, running_worker, reader, hunks_stream
):
    s = deployment.settings
    events = select_events(read_events(hunks_stream), docs=6)
    expected = {(e["doc_id"], e["rev"]): e.get("sha1_after") for e in events}
    assert len(expected) == len(events) > 100
    replay(events, deployment.broker.bootstrap, s.edits_topic, progress=False)

    def answered() -> bool:
        return {(r["doc_id"], r["rev"]) for r in reader.of(s.classes_topic)} >= set(expected)

    assert reader.wait_for(answered, timeout_s=240), "not every revision was answered"
    updates = [r for r in reader.of(s.classes_topic) if (r["doc_id"], r["rev"]) in expected]
    counts = Counter((r["doc_id"], r["rev"]) for r in updates)
    assert max(counts.values()) == 1, "a revision was answered twice without any crash"
    # The token count the worker keeps incrementally equals tokenizing the whole text.
    tokenizer = load_tokenizer()
    texts: dict[str, str] = {}
    token_counts = {}
    for event in events:
        doc = event["doc_id"]
        if "snapshot" in event:
            texts[doc] = event["snapshot"]
        else:
            texts[doc], _ = apply_ops(texts[doc], event["ops"])
        token_counts[(doc, event["rev"])] = len(
            tokenizer(texts[doc], add_special_tokens=False)["input_ids"])
    for record in updates:
        want = expected[(record["doc_id"], record["rev"])]
        if want:
            assert record["sha1"] == want, record
        assert record["length_tokens"] == token_counts[(record["doc_id"], record["rev"])]
        assert record["schema"] == "doc-class/v1"
        assert record["length_tokens"] > 0 or record["length_chars"] == 0
    # Outputs of a document arrive in revision order (one partition per document).
    by_doc: dict[str, list[int]] = {}
    for record in updates:
        by_doc.setdefault(record["doc_id"], []).append(record["rev"])
    assert all(revs == sorted(revs) for revs in by_doc.values())

    # The worker's own account, scraped over HTTP as Prometheus would.
    metrics = running_worker.scrape()
    assert metric_value(metrics, "incstream_events_total", 'outcome="ok"') >= len(events)
    assert metric_value(metrics, "incstream_outputs_total") >= len(events)
    assert metric_value(metrics, "incstream_processing_seconds_count") >= len(events)
    assert "incstream_end_to_end_seconds_bucket" in metrics


def test_bad_input_goes_to_the_dlq_and_the_document_stays_correct(
    deployment, running_worker, reader
):
    s = deployment.settings
    doc = "bad-input-doc"
    producer = edit_producer(deployment.broker.bootstrap)

    def send(value, key: str = doc) -> None:
        producer.send(s.edits_topic, key=key, value=value)

    text0 = "The quick brown fox"
    text1 = text0 + " jumps"
    text2 = text1 + " over"
    text3 = text2 + " the dog."
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 0, "snapshot": text0})
    send(b"{this is not json")
    send({"schema": "doc-edit/v9", "doc_id": doc, "rev": 1, "ops": []})
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 1, "ops": [{"retain": 500}]})
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 1,
          "ops": [{"retain": len(text0)}, {"insert": " jumps"}], "sha1_after": "0" * 40})
    send({"schema": "doc-edit/v1", "doc_id": "someone-else", "rev": 0, "snapshot": "x"})
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 1,
          "ops": [{"retain": len(text0)}, {"insert": " jumps"}], "sha1_after": sha1_hex(text1)})
    # A gap: rev 3 arrives before rev 2, and must wait for it.
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 3,
          "ops": [{"retain": len(text2)}, {"insert": " the dog."}], "sha1_after": sha1_hex(text3)})
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 2,
          "ops": [{"retain": len(text1)}, {"insert": " over"}], "sha1_after": sha1_hex(text2)})
    # A duplicate of rev 1 (an at-least-once producer retry).
    send({"schema": "doc-edit/v1", "doc_id": doc, "rev": 1,
          "ops": [{"retain": len(text0)}, {"insert": " jumps"}], "sha1_after": sha1_hex(text1)})
    producer.flush()
    producer.close()

    def updates():
        return [r for r in reader.of(s.classes_topic) if r["doc_id"] == doc]

    expected_reasons = Counter({"invalid_json": 1, "unknown_schema": 1, "ops_past_end": 1,
                                "checksum_mismatch": 1, "key_mismatch": 1})

    def dlq_reasons() -> Counter:
        return Counter(r["reason"] for r in reader.of(s.dlq_topic))

    assert reader.wait_for(lambda: len(updates()) >= 4 and dlq_reasons() >= expected_reasons,
                           timeout_s=120)
    assert [(r["rev"], r["sha1"]) for r in updates()] == [
        (0, sha1_hex(text0)), (1, sha1_hex(text1)), (2, sha1_hex(text2)), (3, sha1_hex(text3))
    ]
    assert dlq_reasons() == expected_reasons
    bad_json = next(r for r in reader.of(s.dlq_topic) if r["reason"] == "invalid_json")
    assert bad_json["event"] == "{this is not json" and bad_json["error"]
    assert running_worker.alive()
    metrics = running_worker.scrape()
    assert metric_value(metrics, "incstream_events_total", 'outcome="dlq"') == 5
    assert metric_value(metrics, "incstream_events_total", 'outcome="duplicate"') == 1
    assert metric_value(metrics, "incstream_events_total", 'outcome="gap"') == 1
    assert metric_value(metrics, "incstream_dead_letters_total", 'reason="key_mismatch"') == 1


def test_sigterm_stops_the_worker_cleanly_within_30_seconds(running_worker):
    code, seconds = running_worker.stop(grace_s=40)
    assert code == 0, f"exit code {code}"
    assert seconds < 30, f"took {seconds:.1f} s to stop"


def test_dlq_records_are_json_with_reason_and_original(deployment, reader):
    for record in reader.of(deployment.settings.dlq_topic):
        assert record["schema"] == "doc-edit-dlq/v1"
        assert record["reason"] and record["error"]
        json.dumps(record["event"])
