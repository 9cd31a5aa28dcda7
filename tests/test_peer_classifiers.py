"""The dense peers as worker classifiers (pipeline.peer_classifiers), against the engine
bench's own peers (engine.benchmarks.peers) on a short edit history of a multi-chunk text, and
the incremental classifier's chunk-cache-equivalent MACs against what the chunk peer spends.
"""

from __future__ import annotations

import random

import pytest

from incstream.engine.incremental.text_ops import TextChange
from incstream.pipeline.document_sessions import DocumentClassifier, softmax_scores
from incstream.pipeline.metrics import WorkerMetrics
from incstream.pipeline.peer_classifiers import (
    ChunkCacheClassifier,
    DenseClassifier,
    classifier_type,
)
from incstream.state.ordering import AppliedRevision

WORDS = ("stream", "worker", "table", "chunk", "edit", "answer", "model", "cache", "broker",
         "record", "partition", "latency", "label", "document", "token", "state")


def history() -> list[AppliedRevision]:
    """A ~700-token text (three chunks) and three edits: in the first chunk, in the last one,
    and one that changes no token (a doubled space)."""
    rng = random.Random(7)
    text = " ".join(f"The {rng.choice(WORDS)} {rng.choice(WORDS)}s {i} times."
                    for i in range(120))
    revisions = [AppliedRevision(0, TextChange(0, 0, len(text)), True, text, None)]
    for start, deleted, inserted in ((20, 0, "very "), (-30, 6, "quietly"), (40, 0, " ")):
        at = start if start >= 0 else len(text) + start
        if inserted == " ":
            at = text.index(" ", at)  # next to a space: the tokens stay the same
        text = text[:at] + inserted + text[at + deleted:]
        revisions.append(AppliedRevision(len(revisions), TextChange(at, deleted, len(inserted)),
                                         False, text, None))
    return revisions


@pytest.fixture(scope="module")
def chunk_peer() -> ChunkCacheClassifier:
    return ChunkCacheClassifier.load("polarity-minilm-vq64", 1 << 30, WorkerMetrics(),
                                     threads=1)


def test_the_peers_answer_as_the_engine_bench_peers(chunk_peer: ChunkCacheClassifier) -> None:
    from incstream.engine.benchmarks.peers import ChunkCache, full_dense
    from incstream.engine.incremental.chunks import chunk_lengths
    from incstream.engine.model.macs import MacCounter

    peer = chunk_peer
    dense = DenseClassifier(peer.model, peer.manifest, peer.tokenizer, peer.head, 1 << 30)
    revisions = history()
    cached = peer.classify("d", None, revisions)
    full = dense.classify("d", None, revisions)
    reference = ChunkCache(peer.model, peer.tokenizer.cls_token_id, peer.tokenizer.sep_token_id)
    for revision, c, d in zip(revisions, cached, full, strict=True):
        counter = MacCounter()
        _, pooled = full_dense(peer.model, peer.tokenizer, revision.text, peer.policy, counter)
        assert d.scores == c.scores == softmax_scores(peer.head.logits(pooled).tolist(),
                                                      peer.labels)
        assert d.label == c.label and d.macs == d.macs_dense_equivalent == counter.total
        ids = peer.tokenizer(revision.text, add_special_tokens=False,
                               verbose=False)["input_ids"]
        lengths = chunk_lengths(ids, peer.policy, peer.continues_word)
        reused = MacCounter()
        reference.update(ids, lengths, reused)
        assert c.macs == reused.total and c.tokens == len(ids)
    assert len(lengths) >= 3, "the text must span several chunks"
    assert [c.cache for c in cached] == ["miss", "hit", "hit", "hit"]
    assert 0 < cached[1].macs < cached[0].macs and 0 < cached[2].macs < cached[0].macs
    assert cached[3].macs == 0  # no token changed: nothing re-run
    assert {d.cache for d in full} == {"miss"} and len(dense.cache) == 0
    # It holds one float32 vector and the int32 ids per chunk of the current text.
    assert peer.cache.nbytes == 384 * 4 * len(lengths) + 4 * len(ids)


def test_the_chunk_caches_are_evicted_least_recently_used(
        chunk_peer: ChunkCacheClassifier) -> None:
    peer = chunk_peer
    snapshot = history()[0]
    short = AppliedRevision(0, TextChange(0, 0, 200), True, snapshot.text[:200], None)
    before = peer.cache.nbytes
    peer.classify("measure", None, [short])
    size = peer.cache.nbytes - before  # one short document's cache
    small = ChunkCacheClassifier(peer.model, peer.manifest, peer.tokenizer, peer.head,
                                 cache_bytes=2 * size + size // 2)
    small.classify("a", None, [short])
    small.classify("b", None, [short])
    assert len(small.cache) == 2 and small.cache.nbytes == 2 * size
    small.classify("c", None, [snapshot])  # over the whole budget: not kept
    assert len(small.cache) == 2 and small.cache.evictions == 1
    small.classify("c", None, [short])  # evicts a, the least recently used
    assert "a" not in small.cache and "b" in small.cache and "c" in small.cache
    assert small.classify("a", None, [short])[0].cache == "miss"


def test_the_engine_counts_what_the_chunk_cache_would_spend(
        chunk_peer: ChunkCacheClassifier) -> None:
    """incstream_chunk_cache_equivalent_macs_total of the incremental classifier equals the
    MACs the chunk peer really spends on the same revisions (the chunks an edit touched are
    the chunks whose ids changed)."""
    engine_metrics = WorkerMetrics()
    engine = DocumentClassifier.load("polarity-minilm-vq64", 1 << 30, engine_metrics,
                                     threads=1)
    peer_metrics = WorkerMetrics()
    peer = ChunkCacheClassifier(chunk_peer.model, chunk_peer.manifest, chunk_peer.tokenizer,
                                chunk_peer.head, 1 << 30, peer_metrics)
    revisions = history()
    answers = engine.classify("d", None, revisions)
    spent = sum(a.macs for a in peer.classify("d", None, revisions))
    assert [a.cache for a in answers] == ["miss", "hit", "hit", "hit"]
    value = engine_metrics.chunk_cache_equivalent_macs._value.get()
    assert value == spent == peer_metrics.chunk_cache_equivalent_macs._value.get()
    assert value < engine_metrics.dense_equivalent_macs._value.get()


def test_the_setting_picks_the_classifier() -> None:
    assert classifier_type("incremental") is DocumentClassifier
    assert classifier_type("chunk") is ChunkCacheClassifier
    assert classifier_type("dense") is DenseClassifier
    with pytest.raises(ValueError, match="unknown classifier"):
        classifier_type("sparse")
