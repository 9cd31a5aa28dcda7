"""The dense peers as worker classifiers, to measure the engine against in the same pipeline
(`incstream worker --classifier chunk|dense`, `incstream bench pipeline`).

Both answer as a user without the engine would: the bundle's dense baseline (the float32
original MiniLM and the dense head fitted on its pooled vectors), on the engine's tokens and
content-defined chunks (each revision's whole text is tokenized and cut with
engine.incremental.chunks, so the chunks are the engine's):

  chunk  `ChunkCacheClassifier`, engine.benchmarks.peers.ChunkCache per document: re-runs the
         dense model only on the chunks whose token ids the document's cache does not hold,
         and keeps one pooled vector (and the int32 ids) per current chunk;
  dense  `DenseClassifier`, engine.benchmarks.peers.full_dense: re-runs every chunk of the
         whole document at every revision and keeps nothing.

Same interface as pipeline.document_sessions.DocumentClassifier (classify, name, labels,
load). The chunk caches share one LRU (SessionCache) under the worker's session_cache_bytes.
An answer is a function of the revision's text alone: a cache entry is only ever a shortcut
to a vector the same ids would give again, so restarts, evictions and stale entries cannot
change it (they cost misses). Like DocumentClassifier, everything here runs on the worker's
one inference thread.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from incstream.pipeline.document_sessions import (
    DocumentClassifier,
    Inference,
    SessionCache,
    dense_equivalent_macs,
    softmax_scores,
)
from incstream.state.ordering import AppliedRevision


@dataclass
class ChunkVectors:
    """One document's chunk cache: a chunk's content ids (int32 bytes) -> its pooled vector."""

    vectors: dict[bytes, Any]

    def nbytes(self) -> int:
        return sum(len(ids) + v.numel() * v.element_size() for ids, v in self.vectors.items())


class ChunkCacheClassifier:
    """The chunk-cache peer: dense re-runs of the chunks whose token ids changed."""

    reuse_chunks = True
    peer = "dense-chunk-cache"

    def __init__(self, model: Any, manifest: dict, tokenizer: Any, head: Any,
                 cache_bytes: int, metrics: Any | None = None) -> None:
        from incstream.engine.incremental.chunks import ChunkPolicy, word_continuation_mask

        # A VQModel loaded with its float32 `original` (the dense encoder), and the dense
        # baseline's head (engine.model.model_bundle.load_heads).
        self.model, self.manifest, self.tokenizer, self.head = model, manifest, tokenizer, head
        self.name: str = f"{manifest.get('name') or model.bundle}/{self.peer}"
        self.labels: tuple[str, ...] = tuple(head.labels)
        self.continues_word = word_continuation_mask(tokenizer)
        chunking = manifest.get("chunking", {})
        self.policy = ChunkPolicy(max_tokens=chunking.get("chunk_tokens", 256))
        self.cache, self.metrics = SessionCache(cache_bytes), metrics
        if metrics is not None:
            metrics.session_cache_budget_bytes.set(cache_bytes)
            metrics.model_info.labels(self.name).set(1)

    @classmethod
    def load(cls, name_or_dir: str, cache_bytes: int, metrics: Any | None = None,
             threads: int | None = None, mode: Any = None) -> ChunkCacheClassifier:
        """As DocumentClassifier.load; `mode` (the engine's) does not apply to a dense peer."""
        import torch

        from incstream.engine.model.base_model import load_tokenizer
        from incstream.engine.model.model_bundle import load_heads, load_model_bundle

        if threads:
            torch.set_num_threads(threads)
        model, manifest = load_model_bundle(name_or_dir, device="cpu", with_original=True)
        _, dense_head = load_heads(name_or_dir)
        tokenizer = load_tokenizer(manifest["base_model"])
        return cls(model, manifest, tokenizer, dense_head, cache_bytes, metrics)

    def classify(self, doc_id: str, previous_text: str | None,
                 revisions: Sequence[AppliedRevision]) -> list[Inference]:
        """One answer per revision, from its text (`previous_text` is not needed: a chunk's
        vector is found by its ids)."""
        import torch

        with torch.inference_mode():
            return [self._classify_one(doc_id, revision) for revision in revisions]

    def _classify_one(self, doc_id: str, revision: AppliedRevision) -> Inference:
        import torch

        from incstream.engine.incremental.chunks import chunk_lengths, offsets
        from incstream.engine.model.head import document_pooled
        from incstream.engine.model.macs import MacCounter
        from incstream.engine.model.minilm import forward_dense

        started = time.perf_counter()
        held = None
        if self.reuse_chunks:
            if revision.is_snapshot:  # a snapshot replaces the text: start the document over
                self.cache.discard(doc_id)
            held = self.cache.get(doc_id)
        ids = self.tokenizer(revision.text, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = chunk_lengths(ids, self.policy, self.continues_word)
        macs = MacCounter()
        vectors: dict[bytes, Any] = {}
        pooled = []
        rows_run = 0
        for start, n in zip(offsets(lengths), lengths, strict=True):
            content = ids[start : start + n]
            key = array("i", content).tobytes()
            vec = None
            if self.reuse_chunks:  # a chunk met earlier in this text, or at the last revision
                vec = vectors.get(key, held.vectors.get(key) if held is not None else None)
            if vec is None:
                chunk = torch.tensor([self.tokenizer.cls_token_id, *content,
                                      self.tokenizer.sep_token_id], dtype=torch.long)
                vec = forward_dense(self.model.original, chunk, torch.arange(len(chunk)),
                                    macs).mean(0)
                rows_run += len(chunk)
            vectors[key] = vec
            pooled.append(vec)
        logits = self.head.logits(document_pooled(pooled, [n + 2 for n in lengths])).tolist()
        status = "hit" if held is not None else "miss"
        evicted = self.cache.put(doc_id, ChunkVectors(vectors)) if self.reuse_chunks else 0
        spent = int(macs.total)
        dense = dense_equivalent_macs(lengths, self.model.cfg)
        positions = rows_run * self.model.cfg.layers
        seconds = time.perf_counter() - started
        self._count(status, evicted, spent, dense, positions, seconds)
        return Inference(label=self.labels[max(range(len(logits)), key=logits.__getitem__)],
                         scores=softmax_scores(logits, self.labels), cache=status,
                         tokens=len(ids), positions_recomputed=positions, macs=spent,
                         macs_dense_equivalent=dense, seconds=seconds)

    def _count(self, status: str, evicted: int, spent: int, dense: int, positions: int,
               seconds: float) -> None:
        """The worker's classifier metrics, as DocumentClassifier keeps them."""
        m = self.metrics
        if m is None:
            return
        path = "incremental" if status == "hit" else "fresh"
        (m.session_cache_hits if status == "hit" else m.session_cache_misses).inc()
        m.session_cache_evictions.inc(evicted)
        m.session_cache_bytes.set(self.cache.nbytes)
        m.session_cache_sessions.set(len(self.cache))
        m.inference_macs.labels(path).inc(spent)
        m.dense_equivalent_macs.inc(dense)
        if self.reuse_chunks:  # what it spent is what the chunk cache spends
            m.chunk_cache_equivalent_macs.inc(spent)
        m.positions_recomputed.labels(path).inc(positions)
        m.inference_seconds.observe(seconds)
        m.inference_batch_size.observe(1)


class DenseClassifier(ChunkCacheClassifier):
    """The full dense re-run: every chunk of the whole document, every revision."""

    reuse_chunks = False
    peer = "dense-full"


CLASSIFIERS: dict[str, type] = {
    "incremental": DocumentClassifier,
    "chunk": ChunkCacheClassifier,
    "dense": DenseClassifier,
}


def classifier_type(kind: str) -> type:
    """The classifier class of pipeline.settings.Settings.classifier."""
    try:
        return CLASSIFIERS[kind]
    except KeyError:
        raise ValueError(f"unknown classifier {kind!r}; one of {', '.join(CLASSIFIERS)}") \
            from None
