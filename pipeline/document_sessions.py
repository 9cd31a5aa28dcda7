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

Memory (pipeline.memory_budget): a session's bytes are estimated from its token count before it
is built or grown, and the cache evicts least recently used sessions first, so the sessions
never hold more than their budget, not even for a moment. A revision whose document has more
tokens than `token_limit` (max_document_tokens, and what one session may hold within the
budget) is not classified: `classify` returns a `DocumentTooLarge` for it, the worker applies it
to the text anyway (so a later edit that shrinks the document is classified again) and
dead-letters it as `document_too_large`.

Everything here is blocking torch work: the worker calls `classify` on one dedicated thread
(never on the event loop), and the cache is only ever touched from that thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from incstream.engine.model.macs import MacCounter
from incstream.pipeline.memory_budget import (
    SessionSizer,
    bytes_per_row,
    resident_bytes,
    return_freed_memory,
    sessions_budget,
)
from incstream.state.ordering import AppliedRevision

log = logging.getLogger("incstream.sessions")

SCORE_DECIMALS = 9  # probabilities in doc-class/v1; the engine's answers agree to ~1e-12


class _Sized(Protocol):
    def nbytes(self) -> int: ...


class SessionCache:
    """LRU of per-document sessions under a memory budget (bytes of activations).

    Sizes are measured when a session is put (after each update). A session larger than the
    whole budget is not kept (counted as an eviction). `released` runs after sessions were
    evicted (the worker's: return_freed_memory, so their pages go back to the system). Not
    thread-safe: use it from one thread.
    """

    def __init__(self, budget_bytes: int, released: Callable[[], object] | None = None) -> None:
        self.budget_bytes = int(budget_bytes)
        self.released = released
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

    def make_room(self, nbytes: int) -> int:
        """Evict least recently used sessions until `nbytes` more fit the budget (call it
        before building or growing a session, with the cache's own entry for that document
        discarded or counted in `nbytes`); returns how many were evicted."""
        evicted = 0
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            _, (_, old_size) = self._entries.popitem(last=False)
            self.nbytes -= old_size
            evicted += 1
        return self._evicted(evicted)

    def _evicted(self, count: int) -> int:
        self.evictions += count
        if count and self.released is not None:
            self.released()
        return count

    def put(self, doc_id: str, session: _Sized) -> int:
        """Insert or re-measure `session` as most recently used; returns how many were evicted."""
        self.discard(doc_id)
        size = int(session.nbytes())
        if size > self.budget_bytes:  # would evict everything and still not fit
            return self._evicted(1)
        self._entries[doc_id] = (session, size)
        self.nbytes += size
        return self.make_room(0)  # the others go first: this one is the most recently used


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


@dataclass(frozen=True)
class DocumentTooLarge:
    """A revision not classified: its document has more tokens than the classifier's limit.
    No session was built or kept for it."""

    tokens: int
    limit: int
    label = None
    record_writes = None  # no session, no chunk records

    def message(self, rev: int) -> str:
        return (f"rev {rev} has {self.tokens} tokens, over this worker's limit of "
                f"{self.limit} (INCSTREAM_MAX_DOCUMENT_TOKENS, or what the session budget "
                f"holds): not classified (label null); its text is kept, so an edit that "
                f"brings it under the limit is classified again")


@dataclass
class _Work:
    """One revision between DocumentClassifier._prepare and _finish: the session to update
    (None: build it fresh) and how the cache answered."""

    doc_id: str
    previous_text: str | None
    revision: AppliedRevision
    session: Any | None
    status: str  # "miss" | "rebuild", "hit" once updated
    reason: str | None  # why a rebuild
    evicted: int
    estimate: int  # bytes the session will hold
    started: float
    report: Any = None  # the incremental update's EditReport


class BuildCancelled(Exception):
    """The worker is stopping: a session build or update was abandoned part way."""


class StoppableMacs(MacCounter):
    """A session's MAC counter that raises BuildCancelled once `stop` is set.

    The engine counts MACs at every matmul of a build or an update: it is the one place the
    engine calls back while it works, so a stopping worker abandons even a long build within
    one matmul (the event is not acknowledged and is handled again after the restart)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop

    def add(self, category: str, n: int) -> None:
        if self.stop.is_set():
            raise BuildCancelled("the worker is stopping")
        super().add(category, n)


def dense_equivalent_macs(chunk_lengths: Sequence[int], cfg: Any) -> int:
    """MACs of re-running the dense ORIGINAL model on a whole document, chunked like the session
    ([CLS] content [SEP] per chunk), counted as engine.benchmarks.bench counts it
    (engine.model.macs)."""
    from incstream.engine.model.macs import dense_chunk_macs

    return sum(dense_chunk_macs(n + 2, layers=cfg.layers, hidden=cfg.hidden, ffn=cfg.ffn,
                                head_dim=cfg.head_dim) for n in chunk_lengths)


def describe_mode(mode: Any) -> str:
    """"exact", or "fast" with its dial, for the worker's start-up log."""
    if mode == "exact":
        return "exact (every answer equals a fresh build of the text)"
    return (f"fast (tau {mode.tau}, context tolerance {mode.context_tolerance}, refresh after "
            f"{mode.refresh_edits} edits or {mode.refresh_displacement} rows of position debt, "
            f"drifted chunks rebuilt when the top two classes are within "
            f"{mode.refresh_margin}, {mode.matmul} matmuls)")


def softmax_scores(logits: Sequence[float], labels: Sequence[str]) -> dict[str, float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return {label: round(e / total, SCORE_DECIMALS) for label, e in zip(labels, exps,
                                                                          strict=True)}


class DocumentClassifier:
    """A model bundle, its tokenizer and the hot session cache of one worker process."""

    # Built once at start: measures the engine mode's bytes per row (and warms it up, so the
    # baseline memory measured after it includes e.g. the fast mode's float32 weights).
    WARM_UP_TEXT = " ".join(["The worker measures one session before it takes events."] * 12)

    def __init__(self, model: Any, manifest: dict, tokenizer: Any, cache_bytes: int,
                 metrics: Any | None = None, mode: Any = None,
                 max_document_tokens: int = 0) -> None:
        from incstream.engine.incremental.chunks import ChunkPolicy
        from incstream.engine.incremental.fast_mode import resolve_mode

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
        self.cache = SessionCache(cache_bytes, released=return_freed_memory)
        self.metrics = metrics
        self.records: Any = None  # a state.chunk_record_store.ChunkRecordStore (fast mode)
        self.stop = threading.Event()  # set when the worker stops: abandons a build
        self.max_document_tokens = max_document_tokens
        from incstream.engine.incremental.chunks import max_rows

        with torch_no_grad():
            warm = self.fresh(self.WARM_UP_TEXT)
        rows = sum(len(chunk.token_ids) for chunk in warm.chunks)
        # Whether batching documents can change no answer (the engine's batched steps give
        # each document the numbers it would get alone): the worker batches by default then.
        self.batches_alone_exact: bool = warm.engine.batches_alone_exact
        self.sizer = SessionSizer(bytes_per_row(warm.nbytes(), rows),
                                  partial(max_rows, policy=self.policy))
        self.set_sessions_budget(cache_bytes)
        if metrics is not None:
            metrics.model_info.labels(self.name).set(1)

    def set_sessions_budget(self, budget: int) -> None:
        """The sessions' byte budget, and with it the largest document classified."""
        self.cache.budget_bytes = int(budget)
        self.cache.make_room(0)
        fits = self.sizer.max_tokens_within(self.cache.budget_bytes)
        self.token_limit = min(self.max_document_tokens, fits) if self.max_document_tokens \
            else fits
        if self.metrics is not None:
            self.metrics.session_cache_budget_bytes.set(self.cache.budget_bytes)
            self.metrics.max_document_tokens.set(self.token_limit)

    @classmethod
    def load(cls, name_or_dir: str, cache_bytes: int, metrics: Any | None = None,
             threads: int | None = None, mode: Any = None, max_document_tokens: int = 0,
             memory_budget: int | None = None, memory_reserve: int = 0,
             ) -> DocumentClassifier:
        """`mode`: "exact", a FastModeConfig, a callable that picks one from the bundle's
        manifest "engine" section (pipeline.settings.Settings.engine), or None (the bundle's
        choice, else exact). With `memory_budget` (bytes the process may hold resident) the
        sessions get what it leaves over the resident memory measured once the model is
        loaded and warmed up, and `memory_reserve` (pipeline.memory_budget), at most
        `cache_bytes`."""
        import torch

        from incstream.engine.model.base_model import load_tokenizer
        from incstream.engine.model.model_bundle import load_model_bundle

        if threads:
            torch.set_num_threads(threads)
        model, manifest = load_model_bundle(name_or_dir, device="cpu", with_original=False)
        tokenizer = load_tokenizer(manifest["base_model"])
        if callable(mode):
            mode = mode(manifest.get("engine"))
        classifier = cls(model, manifest, tokenizer, cache_bytes, metrics, mode,
                         max_document_tokens)
        log.info("model %s, engine mode %s", classifier.name, describe_mode(classifier.mode))
        baseline = resident_bytes()
        if memory_budget and baseline is not None:
            budget = sessions_budget(memory_budget, baseline, memory_reserve, cache_bytes,
                                     minimum=classifier.sizer.estimate(
                                         classifier.policy.max_content))
            classifier.set_sessions_budget(budget)
            log.info("memory budget %d MiB: model and runtime %d MiB, reserve %d MiB, "
                     "sessions %d MiB (%d B a row); documents up to %d tokens",
                     memory_budget >> 20, baseline >> 20, memory_reserve >> 20, budget >> 20,
                     classifier.sizer.bytes_per_row, classifier.token_limit)
        if metrics is not None and memory_budget:
            metrics.memory_budget_bytes.set(memory_budget)
        return classifier

    # ----- one document, one or more consecutive revisions (a filled gap applies several)
    def classify(self, doc_id: str, previous_text: str | None,
                 revisions: Sequence[AppliedRevision]) -> list[Inference | DocumentTooLarge]:
        """One answer per revision; raises BuildCancelled once `stop` is set."""
        return self.classify_batch([(doc_id, previous_text, revisions)])[0]

    # ----- several documents at once: their incremental updates in one batched engine step
    def classify_batch(self, requests: Sequence[tuple[str, str | None,
                                                      Sequence[AppliedRevision]]],
                       ) -> list[list[Inference | DocumentTooLarge]]:
        """`classify` for several documents (one request each: doc_id, the text before the
        revisions, the revisions), in rounds: round j takes each document's j-th revision,
        and the documents whose session is updated incrementally go through one batched step
        (engine.incremental.session.apply_changes_batched: one Q/K/V and one feed-forward
        matmul per layer for all their changed rows). Answers equal one-at-a-time answers up
        to the batched matmuls' float rounding (the same codes). Raises BuildCancelled once
        `stop` is set."""
        if len({doc_id for doc_id, _, _ in requests}) != len(requests):
            raise ValueError("one request per document (its revisions are ordered)")
        out: list[list[Inference | DocumentTooLarge]] = [[] for _ in requests]
        texts = [previous_text for _, previous_text, _ in requests]
        with torch_no_grad():
            for j in range(max((len(revisions) for _, _, revisions in requests), default=0)):
                works: list[tuple[int, _Work]] = []
                in_flight = 0  # bytes of the round's sessions, out of the cache while they work
                for i, (doc_id, _, revisions) in enumerate(requests):
                    if j >= len(revisions):
                        continue
                    try:
                        prepared = self._prepare(doc_id, texts[i], revisions[j], in_flight)
                    except BuildCancelled:
                        self._log_abandoned(doc_id, revisions[j].rev)
                        raise
                    texts[i] = revisions[j].text
                    if isinstance(prepared, DocumentTooLarge):
                        out[i].append(prepared)
                    else:
                        works.append((i, prepared))
                        in_flight += prepared.estimate
                try:
                    self._update([work for _, work in works])
                    for i, work in works:
                        out[i].append(self._finish(work))
                except BuildCancelled:
                    for _, work in works:
                        self._log_abandoned(work.doc_id, work.revision.rev)
                    raise
        return out

    @staticmethod
    def _log_abandoned(doc_id: str, rev: int) -> None:
        log.warning("the worker is stopping: %r rev %s abandoned part way (its event is "
                    "handled again after the restart)", doc_id, rev)

    def keep_records(self, table: Any) -> bool:
        """Keep fast-mode sessions' chunk records in `table` (the worker's activations table),
        so a session evicted, or lost with a restart or a rebalance, comes back with its codes
        instead of a fresh build (which would answer differently: a fast session's state
        depends on its edit history). Exact mode needs none: a fresh build is the same session.
        Returns whether records are kept."""
        from incstream.engine.incremental.fast_mode import FastModeConfig
        from incstream.state.activation_record import mode_tag
        from incstream.state.chunk_record_store import ChunkRecordStore

        if not isinstance(self.mode, FastModeConfig):
            return False
        self.records = ChunkRecordStore(table, self.name, mode_tag("fast", self.mode.matmul))
        return True

    def fresh(self, text: str) -> Any:
        """A session built from scratch on `text` (what a cache miss does)."""
        from incstream.engine.incremental.session import DocumentSession

        return DocumentSession(self.model, self.tokenizer, text, self.policy, mode=self.mode,
                               macs=StoppableMacs(self.stop))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _restored(self, doc_id: str, text: str) -> Any | None:
        """The session of `text` as its chunk records left it (chunks without a record are
        built), or None when the document has no record."""
        from incstream.engine.incremental.session import DocumentSession

        found = self.records.load(doc_id, self._chunk_contents(text))
        if not found:
            return None
        return DocumentSession(self.model, self.tokenizer, text, self.policy, mode=self.mode,
                               records=found, macs=StoppableMacs(self.stop))

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
        from incstream.engine.incremental.chunks import (
            chunk_lengths,
            offsets,
            word_continuation_mask,
        )
        from incstream.engine.incremental.edit_tokenizer import tokenize

        ids = tokenize(self.tokenizer, text).ids
        lengths = chunk_lengths(ids, self.policy, word_continuation_mask(self.tokenizer))
        return [tuple(ids[start : start + n]) for start, n in zip(offsets(lengths), lengths,
                                                                  strict=True)]

    def _prepare(self, doc_id: str, previous_text: str | None, revision: AppliedRevision,
                 in_flight: int) -> _Work | DocumentTooLarge:
        """Find the session to update (the cached one, or the one its chunk records bring
        back) and make room for what the revision will hold, besides `in_flight` bytes of
        other sessions being worked on; or say the document is too large."""
        from incstream.engine.incremental.edit_tokenizer import token_count_delta

        started = time.perf_counter()
        session = self.cache.get(doc_id)
        status, reason = "miss", None
        evicted = 0
        stale = (session is not None and not revision.is_snapshot
                 and session.text != previous_text)
        if stale:
            # The cached session is not of the stored text: it ran ahead of it (an event left
            # for a rebalance's seek after it was classified, pipeline.app) or behind. Set it
            # aside: the chunk records bring back the stored one, as after a restart.
            self.cache.discard(doc_id)
            session = None
        if (session is None and self.records is not None and previous_text is not None
                and not revision.is_snapshot):
            # Not in memory (a restart, a rebalance, an eviction): the chunk records bring
            # the session of the previous text back, and the edit is applied to it as the
            # uninterrupted worker would have (if it fits: room is made for it first).
            previous_tokens = self.count_tokens(previous_text)
            if previous_tokens <= self.token_limit:
                evicted += self.cache.make_room(in_flight + self.sizer.estimate(previous_tokens))
                session = self._restored(doc_id, previous_text)
        if session is not None and revision.is_snapshot:
            session = None
        elif stale and session is None:
            status, reason = "rebuild", "stale"
        # Out of the cache while it works: its bytes are measured again when it is put back.
        self.cache.discard(doc_id)
        tokens = (len(session.tokens.ids) + token_count_delta(
            self.tokenizer, previous_text, revision.text, revision.change)
            if session is not None else self.count_tokens(revision.text))
        if tokens > self.token_limit:
            self._observe_cache(evicted)
            return DocumentTooLarge(tokens, self.token_limit)
        # Room first: the cache never holds more than its budget, not even while building.
        estimate = self.sizer.estimate(tokens)
        evicted += self.cache.make_room(in_flight + estimate)
        return _Work(doc_id, previous_text, revision, session, status, reason, evicted,
                     estimate, started)

    def _update(self, works: Sequence[_Work]) -> None:
        """Update the works' sessions incrementally, all in one batched engine step; a session
        that failed (its update raised, or its text is not the revision's after it) is dropped,
        to be built fresh."""
        from incstream.engine.incremental.session import apply_changes_batched

        updating = [work for work in works if work.session is not None]
        if not updating:
            return
        if self.metrics is not None:
            self.metrics.inference_batch_size.observe(len(updating))
        try:
            reports = apply_changes_batched([(w.session, w.revision.text, w.revision.change)
                                             for w in updating])
        except BuildCancelled:
            raise
        except Exception:
            # One batched step: which document failed is not known, so each is rebuilt.
            log.exception("incremental update of %s failed; rebuilding",
                          ", ".join(repr(w.doc_id) for w in updating))
            for work in updating:
                work.status, work.reason, work.session = "rebuild", "error", None
            return
        for work, report in zip(updating, reports, strict=True):
            if work.session.text == work.revision.text:
                work.status, work.report = "hit", report
            else:
                log.error("session of %r has other text than rev %s after the edit; "
                          "rebuilding", work.doc_id, work.revision.rev)
                work.status, work.reason, work.session = "rebuild", "text_mismatch", None

    def _finish(self, work: _Work) -> Inference:
        """Build the session fresh where there is none to update, keep it, and answer."""
        m = self.metrics
        session, report = work.session, work.report
        touched: list[int] | None = report.touched if report is not None else None
        if session is None:
            session = self.fresh(work.revision.text)
            if m is not None:
                m.inference_batch_size.observe(1)  # a fresh build is one document's alone
            macs = int(session.macs.total)
            positions = sum(len(c.token_ids) for c in session.chunks) * self.model.cfg.layers
        else:
            macs = int(report.macs["total"])
            positions = sum(sum(u.rows_changed) for u in report.chunk_updates)
        evicted = work.evicted + self.cache.put(work.doc_id, session)
        logits = session.logits().tolist()
        scores = softmax_scores(logits, self.labels)
        label = self.labels[max(range(len(logits)), key=logits.__getitem__)]
        dense = dense_equivalent_macs(session.chunk_lengths, self.model.cfg)
        seconds = time.perf_counter() - work.started
        if m is not None:
            path = "incremental" if work.status == "hit" else "fresh"
            if work.status == "hit":
                m.session_cache_hits.inc()
            elif work.status == "miss":
                m.session_cache_misses.inc()
            else:
                m.session_rebuilds.labels(work.reason).inc()
            self._observe_cache(evicted)
            m.inference_macs.labels(path).inc(macs)
            m.dense_equivalent_macs.inc(dense)
            # The chunk-cache peer re-runs the chunks whose ids changed (all of them on a build).
            m.chunk_cache_equivalent_macs.inc(dense if touched is None else dense_equivalent_macs(
                [session.chunk_lengths[i] for i in touched], self.model.cfg))
            m.positions_recomputed.labels(path).inc(positions)
            m.inference_seconds.observe(seconds)
        writes = self._record_writes(work.doc_id, session, report, work.previous_text)
        return Inference(label=label, scores=scores, cache=work.status,
                         tokens=len(session.tokens.ids), positions_recomputed=positions,
                         macs=macs, macs_dense_equivalent=dense, seconds=seconds,
                         record_writes=writes)

    def _observe_cache(self, evicted: int) -> None:
        if self.metrics is not None:
            self.metrics.session_cache_evictions.inc(evicted)
            self.metrics.session_cache_bytes.set(self.cache.nbytes)
            self.metrics.session_cache_sessions.set(len(self.cache))


def torch_no_grad() -> Any:
    import torch

    return torch.no_grad()
