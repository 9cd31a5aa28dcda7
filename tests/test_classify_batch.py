"""DocumentClassifier.classify_batch: several documents' revisions in rounds, their incremental
updates in one batched engine step, answering as one document at a time does."""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest

from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.text_ops import TextChange
from incstream.pipeline.document_sessions import DocumentClassifier
from incstream.pipeline.metrics import WorkerMetrics
from incstream.state.ordering import AppliedRevision

WORDS = ("stream", "worker", "table", "chunk", "edit", "answer", "model", "cache", "broker")


def typed(seed: int, edits: int) -> list[AppliedRevision]:
    """A ~400-token snapshot, then words typed at random places."""
    rng = random.Random(seed)
    text = " ".join(f"The {rng.choice(WORDS)} {rng.choice(WORDS)}s {i} times." for i in range(70))
    revisions = [AppliedRevision(0, TextChange(0, 0, len(text)), True, text, None)]
    for _ in range(edits):
        at = text.index(" ", rng.randrange(len(text) - 20))
        word = f" {rng.choice(WORDS)}"
        text = text[:at] + word + text[at:]
        revisions.append(AppliedRevision(len(revisions), TextChange(at, 0, len(word)), False,
                                          text, None))
    return revisions


def load(metrics: WorkerMetrics) -> DocumentClassifier:
    return DocumentClassifier.load("polarity-minilm-vq64", 1 << 30, metrics, threads=1,
                                   mode=FastModeConfig())


def test_batched_documents_answer_as_one_at_a_time():
    histories = {f"doc{i}": typed(i, 6) for i in range(3)}
    one_metrics, batch_metrics = WorkerMetrics(), WorkerMetrics()
    alone, together = load(one_metrics), load(batch_metrics)
    expected = {doc: [a for k, r in enumerate(revisions) for a in alone.classify(
                    doc, revisions[k - 1].text if k else None, [r])]
                for doc, revisions in histories.items()}
    # The same revisions in three steps: the snapshots; one edit of each document, batched;
    # the rest, where doc0 brings a filled gap (several revisions in order) and doc2 nothing.
    got = {doc: [] for doc in histories}
    steps = [{doc: (None, r[:1]) for doc, r in histories.items()},
             {doc: (r[0].text, r[1:2]) for doc, r in histories.items()},
             {"doc0": (histories["doc0"][1].text, histories["doc0"][2:]),
              "doc1": (histories["doc1"][1].text, histories["doc1"][2:3])}]
    for step in steps:
        answers = together.classify_batch([(doc, prev, revs) for doc, (prev, revs) in
                                           step.items()])
        for doc, out in zip(step, answers, strict=True):
            got[doc] += out
    assert {doc: len(a) for doc, a in got.items()} == {"doc0": 7, "doc1": 3, "doc2": 2}
    for doc, answers in got.items():
        for mine, theirs in zip(answers, expected[doc], strict=False):
            assert mine.label == theirs.label and mine.cache == theirs.cache
            assert mine.tokens == theirs.tokens and mine.macs == theirs.macs
            assert max(abs(mine.scores[k] - theirs.scores[k]) for k in mine.scores) < 1e-6
    page = generate_latest(batch_metrics.registry).decode()
    revisions_classified = sum(len(a) for a in got.values())
    assert f"incstream_inference_batch_size_sum {float(revisions_classified)}" in page
    # 3 fresh builds (1 each), then batches of 3 and 2 (doc0's and doc1's 3rd revisions),
    # then doc0 alone: its revisions stay in order, one step each.
    assert 'incstream_inference_batch_size_bucket{le="1.0"} 7.0' in page
    assert "incstream_inference_batch_size_count 9.0" in page


def test_one_request_per_document():
    classifier = load(WorkerMetrics())
    revision = typed(0, 0)[0]
    with pytest.raises(ValueError):
        classifier.classify_batch([("a", None, [revision]), ("a", None, [revision])])


def test_a_cached_session_ahead_of_the_stored_text_is_set_aside_for_its_records():
    """An event left for a rebalance's seek after it was classified (pipeline.app) reached the
    cached session but neither the stored text nor the chunk records. When it comes again the
    classifier brings the stored session back from the records, as a restarted worker would,
    and answers as the uninterrupted worker; not with the cached session (one edit ahead) nor a
    fresh build (which answers differently in fast mode)."""
    revisions = typed(7, 4)
    reference = load(WorkerMetrics())  # uninterrupted, one revision at a time

    def previous(k: int) -> str | None:
        return revisions[k - 1].text if k else None

    expected = [reference.classify("d", previous(k), [r])[0] for k, r in enumerate(revisions)]
    metrics = WorkerMetrics()
    worker = load(metrics)
    assert worker.keep_records({})
    for k in range(3):  # handled: answered, records and text stored
        [answer] = worker.classify("d", previous(k), [revisions[k]])
        worker.records.apply(answer.record_writes)
    worker.classify("d", previous(3), [revisions[3]])  # classified, then left for the seek
    [again] = worker.classify("d", previous(3), [revisions[3]])  # ... and handled again
    # updated from the session the records brought back, not rebuilt as stale
    assert again.cache == "hit"
    page = generate_latest(metrics.registry).decode()
    assert 'incstream_session_rebuilds_total{reason="stale"} 0.0' in page
    assert again.label == expected[3].label
    # A restored chunk recomputes its float state in one dense pass (its codes are the
    # records'): within rounding of the uninterrupted answer.
    assert max(abs(again.scores[c] - expected[3].scores[c]) for c in again.scores) < 2e-3
