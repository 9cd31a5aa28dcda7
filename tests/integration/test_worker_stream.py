"""A real broker, a real worker process with the default model: replay real edits, feed it
garbage, scrape metrics."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from answers import assert_same_answer

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


# The default hot-cache budget holds the whole stream (~440 MB of sessions at most). A budget
# below the working set thrashes: Faust interleaves its partitions event by event, so with
# room for ~2 of these 4 documents only a quarter of the revisions were cache hits.
CACHE_BYTES = 2 * 1024**3


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


def test_every_revision_of_a_real_stream_is_answered_once_with_the_right_hash_and_label(
    deployment, running_worker, reader, demo_stream, fresh_classify
):
    s = deployment.settings
    events = select_events(read_events(demo_stream))
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
    by_doc: dict[str, list[dict]] = {}
    for record in updates:
        by_doc.setdefault(record["doc_id"], []).append(record)
    assert all([r["rev"] for r in recs] == sorted(r["rev"] for r in recs)
               for recs in by_doc.values())

    # Every update carries the model's answer and what it cost.
    labels = set(fresh_classify("x").scores)
    for record in updates:
        assert record["label"] in labels and set(record["scores"]) == labels, record
        assert abs(sum(record["scores"].values()) - 1) < 1e-6
        assert record["model"] == "polarity-minilm-vq64"
        cost = record["cost"]
        assert cost["cache"] in ("hit", "miss", "rebuild")
        assert cost["macs_dense_equivalent"] > 0 and cost["macs_incremental"] >= 0
        assert cost["positions_recomputed"] >= 0
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
        assert_same_answer(recs[-1], fresh_classify(texts[doc]), f"{doc} r{recs[-1]['rev']}")

    # The worker's own account, scraped over HTTP as Prometheus would.
    metrics = running_worker.scrape()
    assert metric_value(metrics, "incstream_events_total", 'outcome="ok"') >= len(events)
    assert metric_value(metrics, "incstream_outputs_total") >= len(events)
    assert metric_value(metrics, "incstream_processing_seconds_count") >= len(events)
    assert "incstream_end_to_end_seconds_bucket" in metrics
    caches = Counter(r["cost"]["cache"] for r in updates)
    hits = metric_value(metrics, "incstream_session_cache_hits_total")
    misses = metric_value(metrics, "incstream_session_cache_misses_total")
    assert hits == caches["hit"] > len(events) / 2
    assert misses == caches["miss"] == len(by_doc)  # each document's first snapshot
    assert metric_value(metrics, "incstream_session_cache_evictions_total") == 0
    assert 0 < metric_value(metrics, "incstream_session_cache_bytes") <= CACHE_BYTES
    assert metric_value(metrics, "incstream_session_cache_budget_bytes") == CACHE_BYTES
    incremental = metric_value(metrics, "incstream_inference_macs_total", 'path="incremental"')
    fresh = metric_value(metrics, "incstream_inference_macs_total", 'path="fresh"')
    dense = metric_value(metrics, "incstream_dense_equivalent_macs_total")
    assert incremental == sum(r["cost"]["macs_incremental"] for r in updates
                              if r["cost"]["cache"] == "hit") > 0
    assert dense == sum(r["cost"]["macs_dense_equivalent"] for r in updates)
    assert dense > incremental + fresh > 0, "reusing sessions should save MACs overall"
    assert metric_value(metrics, "incstream_positions_recomputed_total",
                        'path="incremental"') > 0
    assert metric_value(metrics, "incstream_label_changes_total") == sum(
        r["label_changed"] for r in updates)
    assert metric_value(metrics, "incstream_inference_seconds_count") == len(updates)
    assert metric_value(metrics, "incstream_inference_batch_size_sum") == len(updates)
    assert metric_value(metrics, "incstream_model_info", 'model="polarity-minilm-vq64"') == 1


def test_bad_input_goes_to_the_dlq_and_the_document_stays_correct(
    deployment, running_worker, reader, fresh_classify
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
    # rev 2 filled the gap and released rev 3 within one event: both classified, in order.
    for record, text in zip(updates(), (text0, text1, text2, text3), strict=True):
        assert_same_answer(record, fresh_classify(text), f"rev {record['rev']}")
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
