"""The worker's classifier: a hot cache of DocumentSessions, and one answer per revision.

Sessions hold a document's activations (~115 KB per token, float64): a cache, never durable
state (DESIGN.md §3). The durable text in the Faust table is the truth; a session is used only
when its text is exactly the text the revision was applied to, otherwise it is rebuilt from the
revision's text. So a restart, an eviction or a replay after a crash gives the same answer as
the uninterrupted worker (the engine makes an edited session equal a fresh build).

Per revision, `DocumentClassifier.classify` reports where its answer came from (`cache`):
  hit      the cached session was updated incrementally (cost proportional to the edit);
  miss     no cached session (new document, restart, eviction) or a snapshot replaced the
           whole text: built fresh from the revision's text;
  rebuild  a cached session was there but out of step with the durable text (a crash between
           update and commit, a dead-lettered state) or failed the after-edit text check:
           discarded and built fresh.

Everything here is blocking torch work: the worker calls `classify` on one dedicated thread
(never on the event loop), and the cache is only ever touched from that thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from state.ordering import AppliedRevision

log = logging.getLogger("incstream.sessions")

SCORE_DECIMALS = 9  # probabilities in doc-class/v1; the engine's answers agree to ~1e-12


class _Sized(Protocol):
    def nbytes(self) -> int: ...


class SessionCache:
    """LRU of per-document sessions under a memory budget (bytes of activations).

    Sizes are measured when a session is put (after each update). A session larger than the
    whole budget is not kept (counted as an eviction). Not thread-safe: use it from one thread.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._entries

    def get(self, doc_id: str) -> Any | None:
        entry = self._entries.get(doc_id)
        if entry is None:
            return None
        self._entries.move_to_end(doc_id)
        return entry[0]

    def discard(self, doc_id: str) -> None:
        entry = self._entries.pop(doc_id, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def put(self, doc_id: str, session: _Sized) -> int:
        """Insert or re-measure `session` as most recently used; returns how many were evicted."""
        self.discard(doc_id)
        size = int(session.nbytes())
        evicted = 0
        if size > self.budget_bytes:  # would evict everything and still not fit
            self.evictions += 1
            return 1
        self._entries[doc_id] = (session, size)
        self.nbytes += size
        while self.nbytes > self.budget_bytes:
            _, (_, old_size) = self._entries.popitem(last=False)
            self.nbytes -= old_size
            evicted += 1
        self.evictions += evicted
        return evicted


@dataclass(frozen=True)
class Inference:
    """The classifier's answer for one revision, and what it cost."""

    label: str
    scores: dict[str, float]
    cache: str  # "hit" | "miss" | "rebuild"
    tokens: int  # WordPiece tokens in the text (no special tokens)
    positions_recomputed: int  # rows recomputed, summed over layers
    macs: int  # MACs spent (incremental update, or the fresh build)
    macs_dense_equivalent: int  # the dense original model re-run on the whole document
    seconds: float
    # Fast mode: chunk records to write (bytes) or delete (None) in the activations table,
    # keyed by state.chunk_record_store.record_key; None when the worker keeps no records.
    record_writes: dict[bytes, bytes | None] | None = None


def dense_equivalent_macs(chunk_lengths: Sequence[int], cfg: Any) -> int:
    """MACs of re-running the dense ORIGINAL model on a whole document, chunked like the session
    ([CLS] content [SEP] per chunk), counted as engine.benchmarks.bench counts it
    (engine.model.macs)."""
    from engine.model.macs import dense_chunk_macs

    return sum(dense_chunk_macs(n + 2, layers=cfg.layers, hidden=cfg.hidden, ffn=cfg.ffn,
                                head_dim=cfg.head_dim) for n in chunk_lengths)


def softmax_scores(logits: Sequence[float], labels: Sequence[str]) -> dict[str, float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return {label: round(e / total, SCORE_DECIMALS) for label, e in zip(labels, exps,
                                                                          strict=True)}


class DocumentClassifier:
    """A model bundle, its tokenizer and the hot session cache of one worker process."""

    def __init__(self, model: Any, manifest: dict, tokenizer: Any, cache_bytes: int,
                 metrics: Any | None = None, mode: Any = None) -> None:
        from engine.incremental.chunks import ChunkPolicy
        from engine.incremental.fast_mode import resolve_mode

        # "exact" or an engine.incremental.fast_mode.FastModeConfig; None: the bundle's choice,
        # else exact.
        self.mode = mode if mode is not None else resolve_mode(manifest.get("engine"))

        self.model = model
        self.manifest = manifest
        self.name: str = manifest.get("name") or str(model.bundle)
        self.labels: tuple[str, ...] = tuple(model.head.labels)
        self.tokenizer = tokenizer
        self.policy = ChunkPolicy(max_tokens=manifest.get("chunking", {}).get("chunk_tokens",
                                                                               256))
        self.cache = SessionCache(cache_bytes)
        self.metrics = metrics
        self.records: Any = None  # a state.chunk_record_store.ChunkRecordStore (fast mode)
        if metrics is not None:
            metrics.session_cache_budget_bytes.set(cache_bytes)
            metrics.model_info.labels(self.name).set(1)

    @classmethod
    def load(cls, name_or_dir: str, cache_bytes: int, metrics: Any | None = None,
             threads: int | None = None, mode: Any = None) -> DocumentClassifier:
        """`mode`: "exact", a FastModeConfig, a callable that picks one from the bundle's
        manifest "engine" section (pipeline.settings.Settings.engine), or None (the bundle's
        choice, else exact)."""
        import torch

        from engine.model.base_model import load_tokenizer
        from engine.model.model_bundle import load_model_bundle

        if threads:
            torch.set_num_threads(threads)
        model, manifest = load_model_bundle(name_or_dir, device="cpu", with_original=False)
        tokenizer = load_tokenizer(manifest["base_model"])
        if callable(mode):
            mode = mode(manifest.get("engine"))
        return cls(model, manifest, tokenizer, cache_bytes, metrics, mode)

    # ----- one document, one or more consecutive revisions (a filled gap applies several)
    def classify(self, doc_id: str, previous_text: str | None,
                 revisions: Sequence[AppliedRevision]) -> list[Inference]:
        import torch

        out = []
        with torch.no_grad():
            for revision in revisions:
                out.append(self._classify_one(doc_id, previous_text, revision))
                previous_text = revision.text
        return out

    def keep_records(self, table: Any) -> bool:
        """Keep fast-mode sessions' chunk records in `table` (the worker's activations table),
        so a session evicted, or lost with a restart or a rebalance, comes back with its codes
        instead of a fresh build (which would answer differently: a fast session's state
        depends on its edit history). Exact mode needs none: a fresh build is the same session.
        Returns whether records are kept."""
        from engine.incremental.fast_mode import FastModeConfig
        from state.activation_record import mode_tag
        from state.chunk_record_store import ChunkRecordStore

        if not isinstance(self.mode, FastModeConfig):
            return False
        self.records = ChunkRecordStore(table, self.name, mode_tag("fast", self.mode.matmul))
        return True

    def fresh(self, text: str) -> Any:
        """A session built from scratch on `text` (what a cache miss does)."""
        from engine.incremental.session import DocumentSession

        return DocumentSession(self.model, self.tokenizer, text, self.policy, mode=self.mode)

    def _restored(self, doc_id: str, text: str) -> Any | None:
        """The session of `text` as its chunk records left it (chunks without a record are
        built), or None when the document has no record."""
        from engine.incremental.session import DocumentSession

        found = self.records.load(doc_id, self._chunk_contents(text))
        if not found:
            return None
        return DocumentSession(self.model, self.tokenizer, text, self.policy, mode=self.mode,
                               records=found)

    def _record_writes(self, doc_id: str, session: Any, report: Any | None,
                       previous_text: str | None) -> dict[bytes, bytes | None] | None:
        """Records to write after a revision: the touched chunks' after an update; after a
        fresh build every chunk's, and deletes for the previous text's other chunks."""
        if self.records is None:
            return None
        if report is not None:
            return self.records.changes(doc_id, session.chunk_records(report.touched),
                                        report.removed)
        removed = self._chunk_contents(previous_text) if previous_text else []
        return self.records.changes(doc_id, session.chunk_records(), removed)

    def _chunk_contents(self, text: str) -> list[tuple[int, ...]]:
        from engine.incremental.chunks import chunk_lengths, offsets, word_continuation_mask
        from engine.incremental.edit_tokenizer import tokenize

        ids = tokenize(self.tokenizer, text).ids
        lengths = chunk_lengths(ids, self.policy, word_continuation_mask(self.tokenizer))
        return [tuple(ids[start : start + n]) for start, n in zip(offsets(lengths), lengths,
                                                                  strict=True)]

    def _classify_one(self, doc_id: str, previous_text: str | None,
                      revision: AppliedRevision) -> Inference:
        started = time.perf_counter()
        m = self.metrics
        session = self.cache.get(doc_id)
        status, reason = "miss", None
        macs = positions = 0
        report = None
        if (session is None and self.records is not None and previous_text is not None
                and not revision.is_snapshot):
            # Not in memory (a restart, a rebalance, an eviction): the chunk records bring
            # the session of the previous text back, and the edit is applied to it as the
            # uninterrupted worker would have.
            session = self._restored(doc_id, previous_text)
        touched: list[int] | None = None  # chunks an incremental update touched
        if session is not None and revision.is_snapshot:
            self.cache.discard(doc_id)
            session = None
        elif session is not None and session.text != previous_text:
            status, reason = "rebuild", "stale"
        elif session is not None:
            try:
                report = session.apply_change(revision.text, revision.change)
            except Exception:
                log.exception("incremental update of %r failed; rebuilding", doc_id)
                status, reason = "rebuild", "error"
            else:
                if session.text == revision.text:
                    status = "hit"
                    touched = report.touched
                    macs = int(report.macs["total"])
                    positions = sum(sum(u.rows_changed) for u in report.chunk_updates)
                else:
                    log.error("session of %r has other text than rev %s after the edit; "
                              "rebuilding", doc_id, revision.rev)
                    status, reason = "rebuild", "text_mismatch"
        if status != "hit":
            report = None
            self.cache.discard(doc_id)  # free its memory before building the new one
            session = self.fresh(revision.text)
            macs = int(session.macs.total)
            positions = sum(len(c.token_ids) for c in session.chunks) * self.model.cfg.layers
        evicted = self.cache.put(doc_id, session)
        logits = session.logits().tolist()
        scores = softmax_scores(logits, self.labels)
        label = self.labels[max(range(len(logits)), key=logits.__getitem__)]
        dense = dense_equivalent_macs(session.chunk_lengths, self.model.cfg)
        seconds = time.perf_counter() - started
        if m is not None:
            path = "incremental" if status == "hit" else "fresh"
            if status == "hit":
                m.session_cache_hits.inc()
            elif status == "miss":
                m.session_cache_misses.inc()
            else:
                m.session_rebuilds.labels(reason).inc()
            m.session_cache_evictions.inc(evicted)
            m.session_cache_bytes.set(self.cache.nbytes)
            m.session_cache_sessions.set(len(self.cache))
            m.inference_macs.labels(path).inc(macs)
            m.dense_equivalent_macs.inc(dense)
            # The chunk-cache peer re-runs the chunks whose ids changed (all of them on a build).
            m.chunk_cache_equivalent_macs.inc(dense if touched is None else dense_equivalent_macs(
                [session.chunk_lengths[i] for i in touched], self.model.cfg))
            m.positions_recomputed.labels(path).inc(positions)
            m.inference_seconds.observe(seconds)
            m.inference_batch_size.observe(1)  # one document per forward: no batching yet
        writes = self._record_writes(doc_id, session, report, previous_text)
        return Inference(label=label, scores=scores, cache=status,
                         tokens=len(session.tokens.ids), positions_recomputed=positions,
                         macs=macs, macs_dense_equivalent=dense, seconds=seconds,
                         record_writes=writes)
