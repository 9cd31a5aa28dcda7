"""A document's incremental inference session: text -> tokens -> chunks -> VQ activations.

`DocumentSession` owns the current text, its tokens (with character offsets), the chunks and
each chunk's activations. `apply_ops` takes doc-edit/v1 character ops, turns them into a minimal
token edit (engine.incremental.edit_tokenizer), re-cuts the tokens into chunks around the edit
(engine.incremental.chunks: content-defined, so only cuts near the edit move), keeps every
chunk whose tokens are unchanged, and updates the others in the session's mode: exactly
(engine.incremental.incremental_attention) or fast (engine.incremental.fast_chunk), or rebuilds
them. Every MAC goes to the session's MacCounter, the same counter type the dense paths use.

Invariant (tested, and checked by the benchmark): after every edit the session equals a fresh
session built on the current text: the same chunk layout, and each chunk's activations equal
`VQModel.forward` on its token ids with canonical positions (same codes, logits within 1e-9).
So the answer never depends on the edit history, and a cache can be rebuilt from the text.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from incstream.engine.incremental.chunk_record import ChunkRecord
from incstream.engine.incremental.chunks import (
    ChunkPolicy,
    chunk_lengths,
    offsets,
    relayout,
    word_continuation_mask,
)
from incstream.engine.incremental.edit_tokenizer import TokenEdit, apply_text_change, tokenize
from incstream.engine.incremental.fast_chunk import (
    FastChunk,
    FastSplice,
    FastUpdate,
    build_fast_chunk,
    fast_chunk_record,
    restore_fast_chunk,
    rows_alone_exact,
    update_fast_chunks,
    use_fused_kernel,
)
from incstream.engine.incremental.fast_mode import FastModeConfig, fast_weights
from incstream.engine.incremental.incremental_attention import update_layer
from incstream.engine.incremental.text_ops import TextChange, apply_ops
from incstream.engine.model.head import document_pooled
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import embed
from incstream.engine.model.vq_model import ChunkActivations, VQModel


@dataclass
class ChunkUpdate:
    """What one chunk's update did: rows whose layer input changed, per layer."""

    rows_changed: list[int] = field(default_factory=list)
    searched: int = 0
    rebuilt: bool = False
    refreshed: bool = False  # fast mode: rebuilt because a refresh budget was passed
    near_tie: bool = False  # fast mode: rebuilt because the answer was near a tie (refreshed)
    full_rows: int = 0  # rows whose softmax state was recomputed whole (incl. changed rows)
    rebased: int = 0  # unchanged rows recomputed whole for precision (rebase / cancellation)
    # Smallest margin/2 - drift among (row, head) searches skipped: how close a skipped search
    # came to the bound that makes skipping exact (must stay above MARGIN_SLACK).
    min_skip_slack: float = float("inf")


@dataclass
class EditReport:
    token_edit: TokenEdit
    macs: dict[str, int]
    touched: list[int]  # indices (after the edit) of chunks that were updated or rebuilt
    chunk_updates: list[ChunkUpdate]
    seconds: float
    # Token ids of the chunks the edit replaced (updated or dropped): what a store of chunk
    # records may forget (the touched chunks' new records replace them).
    removed: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class PendingChunk:
    """A chunk an edit touched, waiting for its update (run_pending fills `result`: the
    updated chunk and its report, REFRESH, or None = build it)."""

    old: ChunkActivations | FastChunk | None
    content: list[int]
    prefix: int
    suffix: int
    result: Any = None


@dataclass
class EditPlan:
    """One document's edit between plan_token_edit and finish_token_edit."""

    edit: TokenEdit
    first: int  # first chunk of the re-cut region
    replaced: int  # old chunks in it
    lengths: list[int]  # its new chunk lengths
    slots: list[Any]  # per new chunk: a kept chunk or a PendingChunk
    macs: MacCounter  # what this edit's updates cost
    old_region: list[Any] = field(default_factory=list)  # the old chunks first..first+replaced

    def removed_contents(self) -> list[tuple[int, ...]]:
        """Token ids of the old chunks of the region that are not kept as they were."""
        kept = {id(slot) for slot in self.slots if not isinstance(slot, PendingChunk)}
        return [tuple(c.token_ids[1:-1].tolist()) for c in self.old_region if id(c) not in kept]


def run_pending(plans: Sequence[tuple[DocumentSession, EditPlan]]) -> None:
    """Update the pending chunks of several documents' edits: the fast-mode ones together,
    layer by layer, one Q/K/V and one feed-forward matmul per layer for all their changed rows
    (engine.incremental.fast_chunk.update_fast_chunks); exact-mode chunks one by one."""
    batches: dict[int, tuple[Any, list[FastSplice]]] = {}
    running: list[tuple[PendingChunk, FastSplice]] = []
    for session, plan in plans:
        for slot in plan.slots:
            if not isinstance(slot, PendingChunk) or slot.old is None:
                continue
            engine = session.engine
            if isinstance(engine, FastChunks):
                started = engine.start(slot.old, slot.content, slot.prefix, slot.suffix,
                                       plan.macs)
                if isinstance(started, FastSplice):
                    batches.setdefault(id(engine.fw), (engine.fw, []))[1].append(started)
                    running.append((slot, started))
                else:
                    slot.result = started
            else:
                slot.result = engine.update(slot.old, slot.content, slot.prefix, slot.suffix,
                                            plan.macs)
    for fw, splices in batches.values():
        update_fast_chunks(fw, splices)
    for slot, splice in running:
        slot.result = splice.result()


@torch.inference_mode()  # no autograd bookkeeping on the hot path (~8% of an edit's time)
def apply_changes_batched(
        changes: Sequence[tuple[DocumentSession, str, TextChange]]) -> list[EditReport]:
    """Apply one text change to each of several documents' sessions in one batched step
    (run_pending): the answers are those of applying them one at a time, up to float
    rounding of the batched matmuls. Each report's MACs are its own document's; its seconds
    are the whole batch's."""
    if len({id(session) for session, _, _ in changes}) != len(changes):
        raise ValueError("one change per session in a batch (a document's edits are ordered)")
    started = time.perf_counter()
    plans = []
    for session, new_text, change in changes:
        _, edit = apply_text_change(session.tokenizer, session.tokens, new_text, change)
        plans.append((session, edit, session.plan_token_edit(edit, _fresh_counter(session))))
    run_pending([(session, plan) for session, _, plan in plans if plan is not None])
    results = []
    for session, edit, plan in plans:
        removed = plan.removed_contents() if plan is not None else []
        touched, updates = session.finish_token_edit(plan) if plan is not None else ([], [])
        macs = plan.macs if plan is not None else MacCounter()
        session.macs.merge(macs)
        results.append((edit, macs.as_dict(), touched, updates, removed))
    seconds = time.perf_counter() - started
    return [EditReport(edit, macs, touched, updates, seconds, removed)
            for edit, macs, touched, updates, removed in results]


def _fresh_counter(session: DocumentSession) -> MacCounter:
    """An empty counter of the session's own kind (a subclass may watch every matmul, e.g. to
    abandon work when the worker stops), for one edit's MACs."""
    counter = copy.copy(session.macs)
    counter.reset()
    return counter


def apply_ops_batched(edits: Sequence[tuple[DocumentSession, Sequence[Any]]]) -> list[EditReport]:
    """apply_ops for several documents at once (apply_changes_batched)."""
    changes = []
    for session, ops in edits:
        new_text, change = apply_ops(session.text, ops)
        changes.append((session, new_text, change))
    return apply_changes_batched(changes)


def build_chunk(model: VQModel, cls_id: int, sep_id: int, content: Sequence[int],
                macs: MacCounter) -> ChunkActivations:
    """A fresh chunk: dense VQ forward with canonical position ids."""
    ids = torch.tensor([cls_id, *content, sep_id], dtype=torch.long)
    return model.forward(ids, torch.arange(len(ids)), macs)


def common_ends(old: Sequence[int], new: Sequence[int]) -> tuple[int, int]:
    """Lengths of the common prefix and the common suffix (not overlapping) of two lists."""
    limit = min(len(old), len(new))
    prefix = 0
    while prefix < limit and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    return prefix, suffix


def update_chunk(model: VQModel, acts: ChunkActivations, content: Sequence[int],
                 prefix: int, suffix: int,
                 macs: MacCounter) -> tuple[ChunkActivations, ChunkUpdate]:
    """Bring a chunk to new `content` incrementally: one splice, keeping the first `prefix` and
    last `suffix` content tokens (engine.incremental.session.common_ends of old and new content).

    Position ids stay canonical, so rows after the splice move to new positions when the splice
    changes the length: they count as changed at layer 0, like the inserted rows. Rows before
    the splice keep their layer-0 input; whether they change later depends on their codes.
    """
    dev = model.device
    ids_old = acts.token_ids
    n_old = len(ids_old)
    r0 = prefix + 1  # first replaced row ([CLS] is row 0)
    r1 = n_old - 1 - suffix  # end of the replaced rows in the old chunk
    ins = torch.tensor(list(content[prefix : len(content) - suffix]), dtype=torch.long,
                       device=dev)
    ids = torch.cat([ids_old[:r0], ins, ids_old[r1:]])
    pos = torch.arange(len(ids), device=dev)
    old_src = torch.cat([torch.arange(r0, device=dev),
                         torch.full((len(ins),), -1, dtype=torch.long, device=dev),
                         torch.arange(r1, n_old, device=dev)])
    moved = acts.position_ids.to(dev)[old_src.clamp(min=0)] != pos
    changed = (old_src < 0) | moved
    x = torch.empty(len(ids), model.cfg.hidden, dtype=acts.out.dtype, device=dev)
    x[~changed] = acts.layers[0].x[old_src[~changed]]
    x[changed] = embed(model.w, ids[changed], pos[changed])
    report = ChunkUpdate()
    layers = []
    for layer, old in enumerate(acts.layers):
        old_out = acts.layers[layer + 1].x if layer + 1 < len(acts.layers) else acts.out
        report.rows_changed.append(int(changed.sum()))
        state, x, changed, stats = update_layer(model, layer, old, old_out, x, old_src,
                                                changed, macs)
        report.searched += stats.searched
        report.full_rows += stats.full_rows
        report.rebased += stats.rebased
        report.min_skip_slack = min(report.min_skip_slack, stats.min_margin_skipped)
        layers.append(state)
    return ChunkActivations(ids, pos, layers, x), report


REFRESH = "refresh"  # what a mode's update returns when the chunk must be rebuilt canonically


class ExactChunks:
    """Exact mode: every chunk equals a fresh build of its tokens (float64, canonical ids)."""

    name = "exact"
    # A batched step runs exact chunks one by one (run_pending): each answers as it would alone.
    batches_alone_exact = True

    def __init__(self, model: VQModel):
        self.model = model

    def build(self, ids: torch.Tensor, macs: MacCounter) -> ChunkActivations:
        return self.model.forward(ids, torch.arange(len(ids)), macs)

    def record(self, chunk: ChunkActivations) -> ChunkRecord:
        """An exact chunk is a function of its tokens: the record is its token ids."""
        return ChunkRecord(content=tuple(chunk.token_ids[1:-1].tolist()))

    def restore(self, record: ChunkRecord, ids: torch.Tensor,
                macs: MacCounter) -> ChunkActivations:
        return self.build(ids, macs)  # the same activations, bit for bit

    def update(self, chunk: ChunkActivations, content: Sequence[int], prefix: int, suffix: int,
               macs: MacCounter) -> tuple[ChunkActivations, ChunkUpdate] | None:
        """The incremental update, or None when rebuilding the chunk is the better deal."""
        n = len(content)
        old_n = len(chunk.token_ids) - 2
        # Update in place when some rows keep their layer-0 input, else rebuild the chunk.
        kept = prefix + (suffix if old_n == n else 0)
        if kept < max(1, n // 8):
            return None
        return update_chunk(self.model, chunk, content, prefix, suffix, macs)


class FastChunks:
    """Fast mode (engine.incremental.fast_mode): stable ids, held codes and contexts, refresh
    budgets."""

    name = "fast"

    def __init__(self, model: VQModel, config: FastModeConfig):
        self.fw = fast_weights(model, config.matmul)
        self.config = config
        # Whether a batched step gives each chunk the numbers it would get alone, whoever
        # shares the step (the float16 kernels; fast_chunk._shared_calls): then batching
        # documents cannot change an answer.
        self.batches_alone_exact = rows_alone_exact(
            self.fw, use_fused_kernel(config, self.fw.w.device, self.fw.w.config.head_dim))

    def build(self, ids: torch.Tensor, macs: MacCounter) -> FastChunk:
        return build_fast_chunk(self.fw, self.config, ids, macs)

    def record(self, chunk: FastChunk) -> ChunkRecord:
        return fast_chunk_record(chunk)

    def restore(self, record: ChunkRecord, ids: torch.Tensor, macs: MacCounter) -> FastChunk:
        if record.codes is None or record.positions is None:  # an exact-mode record
            return self.build(ids, macs)
        return restore_fast_chunk(self.fw, self.config, record, int(ids[0]), int(ids[-1]),
                                  macs)

    def start(self, chunk: FastChunk, content: Sequence[int], prefix: int, suffix: int,
              macs: MacCounter) -> FastSplice | str | None:
        """The update as a FastSplice to run (alone or batched with others), or REFRESH /
        None when the chunk is to be rebuilt."""
        cfg = self.config
        if chunk.spent:
            return None  # an update of it did not finish: its Q/K/V are no longer its own
        if cfg.refresh_edits and chunk.edits + 1 >= cfg.refresh_edits:
            return REFRESH  # rebuild canonically
        if prefix + suffix == 0:
            return None  # nothing kept
        splice = FastSplice(self.fw, cfg, chunk, content, prefix, suffix, macs)
        # Judged on the ids the update would leave, not those the chunk has: a chunk that is
        # not edited again keeps its ids for good, so it must not be left past the budget.
        if cfg.refresh_displacement and splice.displacement > cfg.refresh_displacement:
            return REFRESH
        return splice

    def update(self, chunk: FastChunk, content: Sequence[int], prefix: int, suffix: int,
               macs: MacCounter) -> tuple[FastChunk, FastUpdate] | str | None:
        splice = self.start(chunk, content, prefix, suffix, macs)
        if not isinstance(splice, FastSplice):
            return splice
        update_fast_chunks(self.fw, [splice])
        return splice.result()


def chunk_mode(model: VQModel, mode: str | FastModeConfig | None) -> ExactChunks | FastChunks:
    """"exact" (default), "fast" (default dial) or a FastModeConfig."""
    if mode is None or mode == "exact":
        return ExactChunks(model)
    if mode == "fast":
        return FastChunks(model, FastModeConfig())
    if isinstance(mode, FastModeConfig):
        return FastChunks(model, mode)
    raise ValueError(f"unknown engine mode {mode!r} (exact or fast)")


def _row_weighted(chunk: ChunkActivations | FastChunk) -> torch.Tensor:
    """A chunk's pooled vector times its rows (float64): its share of the document's sum."""
    return chunk.pooled.to(torch.float64) * len(chunk.token_ids)


class DocumentSession:
    """Incremental VQ inference state of one document."""

    @torch.inference_mode()
    def __init__(self, model: VQModel, tokenizer: Any, text: str = "",
                 policy: ChunkPolicy | None = None, macs: MacCounter | None = None,
                 mode: str | FastModeConfig | None = None,
                 records: Sequence[ChunkRecord] | None = None):
        """A session on `text`: every chunk built, or, with `records` (the chunk_records() of
        a session on the same text, e.g. read back from durable storage), restored from the
        record of the same content where there is one (restored_chunks counts them)."""
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy or ChunkPolicy()
        self.macs = macs if macs is not None else MacCounter()
        self.engine = chunk_mode(model, mode)
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.tokens = tokenize(tokenizer, text)
        self.continues_word = word_continuation_mask(tokenizer)
        self.chunks: list[ChunkActivations | FastChunk] = []
        ids = self.tokens.ids
        self._lengths = chunk_lengths(ids, self.policy, self.continues_word)
        saved: dict[tuple[int, ...], list[ChunkRecord]] = {}
        for record in records or ():
            saved.setdefault(record.content, []).append(record)
        self.restored_chunks = 0
        for start, n in zip(offsets(self._lengths), self._lengths, strict=True):
            content = ids[start : start + n]
            matches = saved.get(tuple(content))
            if matches:  # equal contents are matched in document order
                chunk_ids = torch.tensor([self.cls_id, *content, self.sep_id], dtype=torch.long)
                self.chunks.append(self.engine.restore(matches.pop(0), chunk_ids, self.macs))
                self.restored_chunks += 1
            else:
                self.chunks.append(self._build(content, self.macs))
        self._sum = self._exact_sum()
        self._edits_since_sum = 0

    # ----- reading
    @property
    def text(self) -> str:
        return self.tokens.text

    @property
    def chunk_lengths(self) -> list[int]:
        """Content tokens per chunk (without [CLS]/[SEP])."""
        return list(self._lengths)

    def nbytes(self) -> int:
        """Memory held by the activations of all chunks (tokens and text not counted)."""
        return sum(c.nbytes() for c in self.chunks)

    def chunk_records(self, indices: Sequence[int] | None = None) -> list[ChunkRecord]:
        """The durable part of every chunk (or of the chunks at `indices`, e.g. an edit's
        `touched`), in document order (engine.incremental.chunk_record): pass them back as
        `records=` to bring the session back."""
        chosen = self.chunks if indices is None else [self.chunks[i] for i in indices]
        return [self.engine.record(chunk) for chunk in chosen]

    def chunk_logits(self, index: int) -> torch.Tensor:
        return self.model.head.logits(self.chunks[index].pooled)

    def _exact_sum(self) -> torch.Tensor:
        """Sum over chunks of pooled x rows (float64): the document vector times its rows."""
        return sum((_row_weighted(c) for c in self.chunks),
                   torch.zeros(self.model.cfg.hidden, dtype=torch.float64,
                               device=self.model.device))

    def pooled(self) -> torch.Tensor:
        """Token-count-weighted mean of the chunks' pooled vectors (= engine.model.head.
        document_pooled), kept as a running sum so reading it does not visit every chunk."""
        rows = sum(self._lengths) + 2 * len(self._lengths)
        return self._sum / rows

    def logits(self) -> torch.Tensor:
        return self.model.head.logits(self.pooled())

    # ----- editing
    def apply_ops(self, ops: Sequence[Any]) -> EditReport:
        new_text, change = apply_ops(self.text, ops)
        return self.apply_change(new_text, change)

    def apply_change(self, new_text: str, change: TextChange) -> EditReport:
        return apply_changes_batched([(self, new_text, change)])[0]

    @property
    def mode(self) -> str:
        return self.engine.name

    def _build(self, content: Sequence[int], macs: MacCounter) -> ChunkActivations | FastChunk:
        ids = torch.tensor([self.cls_id, *content, self.sep_id], dtype=torch.long)
        return self.engine.build(ids, macs)

    @torch.inference_mode()
    def apply_token_edit(self, edit: TokenEdit) -> tuple[list[int], list[ChunkUpdate]]:
        """Re-cut the edited tokens around the edit and bring each chunk there up to date
        (plan_token_edit, run_pending, finish_token_edit; the session's token list must already
        be the edited one, as apply_change leaves it)."""
        plan = self.plan_token_edit(edit, self.macs)
        if plan is None:
            return [], []
        run_pending([(self, plan)])
        return self.finish_token_edit(plan)

    def plan_token_edit(self, edit: TokenEdit, macs: MacCounter) -> EditPlan | None:
        """Which chunks an edit touches, and what each of them becomes (None: a no-op edit).

        The chunks still hold the old tokens. engine.incremental.chunks.relayout re-cuts only
        the chunks near the edit (the layout equals a fresh cut of all tokens); the rest are
        kept untouched, so an edit costs nothing per chunk elsewhere in the document. Inside
        the re-cut region a new chunk that starts where an old chunk started (mapped across
        the edit) is that old chunk, kept as is when its tokens are unchanged and updated
        incrementally otherwise (a PendingChunk); any other new chunk is built.
        """
        if edit.is_noop:
            return None
        ids = self.tokens.ids
        first, replaced, lengths = relayout(ids, self._lengths, edit.start, edit.deleted,
                                            len(edit.inserted), self.policy,
                                            self.continues_word)
        region_start = sum(self._lengths[:first]) if first else 0
        shift = len(edit.inserted) - edit.deleted
        edit_end = edit.start + edit.deleted  # in old coordinates
        by_new_start: dict[int, ChunkActivations | FastChunk] = {}
        start = region_start
        for k in range(first, first + replaced):
            if start <= edit.start:
                by_new_start[start] = self.chunks[k]
            elif start >= edit_end:
                by_new_start[start + shift] = self.chunks[k]
            start += self._lengths[k]
        slots: list[ChunkActivations | FastChunk | PendingChunk] = []
        start = region_start
        for n in lengths:
            content = ids[start : start + n]
            old = by_new_start.get(start)
            start += n
            old_content = old.token_ids[1:-1].tolist() if old is not None else None
            if old_content == content:
                slots.append(old)
                continue
            prefix, suffix = common_ends(old_content or [], content)
            slots.append(PendingChunk(old, content, prefix, suffix))
        return EditPlan(edit, first, replaced, lengths, slots, macs,
                        self.chunks[first : first + replaced])

    def finish_token_edit(self, plan: EditPlan) -> tuple[list[int], list[ChunkUpdate]]:
        """Install what the plan's pending chunks became (building those that were not
        updated); returns the touched chunk indices and their updates."""
        new_chunks: list[ChunkActivations | FastChunk] = []
        touched: list[int] = []
        updates: list[ChunkUpdate | FastUpdate] = []
        for slot in plan.slots:
            if not isinstance(slot, PendingChunk):
                new_chunks.append(slot)
                continue
            touched.append(plan.first + len(new_chunks))
            done = slot.result
            if done is not None and done is not REFRESH:
                acts, update = done
            else:
                acts, update = self._rebuild(slot.content, plan.macs, refreshed=done is REFRESH)
            new_chunks.append(acts)
            updates.append(update)
        first, replaced = plan.first, plan.replaced
        old_region = self.chunks[first : first + replaced]
        self.chunks[first : first + replaced] = new_chunks
        self._lengths[first : first + replaced] = plan.lengths
        self._edits_since_sum += 1
        if self._edits_since_sum >= 256:  # wipe the running sum's rounding now and then
            self._sum, self._edits_since_sum = self._exact_sum(), 0
        else:
            for c in old_region:
                self._sum -= _row_weighted(c)
            for c in new_chunks:
                self._sum += _row_weighted(c)
        return self._settle_near_tie(touched, updates, plan.macs)

    def _rebuild(self, content: Sequence[int], macs: MacCounter, refreshed: bool = False,
                 near_tie: bool = False) -> tuple[ChunkActivations | FastChunk, ChunkUpdate]:
        """A chunk built from scratch, and the update that reports it (every row recomputed)."""
        acts = self._build(content, macs)
        return acts, ChunkUpdate([len(acts.token_ids)] * self.model.cfg.layers, 0, True,
                                 refreshed=refreshed, near_tie=near_tie)

    def _settle_near_tie(self, touched: list[int], updates: list[Any],
                         macs: MacCounter) -> tuple[list[int], list[Any]]:
        """Fast mode's near-tie refresh (FastModeConfig.refresh_margin): when the answer's two
        most probable classes are closer than the margin, rebuild every chunk that carries
        drift (updated incrementally at least `near_tie_edits` times since its last build), so
        the label is a fresh build's where drift could flip it. Returns the edit's touched
        indices and updates with the rebuilt chunks added (their records must be written
        too), in document order."""
        if not isinstance(self.engine, FastChunks) or not self.engine.config.refresh_margin:
            return touched, updates
        cfg = self.engine.config
        probs = torch.softmax(self.logits().to(torch.float64), -1)
        if probs.numel() < 2:
            return touched, updates
        top = probs.topk(2).values
        if float(top[0] - top[1]) >= cfg.refresh_margin:
            return touched, updates
        by_index = dict(zip(touched, updates, strict=True))
        for i, chunk in enumerate(self.chunks):
            if chunk.edits < cfg.near_tie_edits:
                continue  # built canonically (no drift), or too few updates since to matter
            fresh, by_index[i] = self._rebuild(chunk.token_ids[1:-1].tolist(), macs,
                                               refreshed=True, near_tie=True)
            self._sum += _row_weighted(fresh) - _row_weighted(chunk)
            self.chunks[i] = fresh
        order = sorted(by_index)
        return order, [by_index[i] for i in order]

    # ----- checking
    def reference_check(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Compare the session with an independent fresh exact build of its current TEXT.

        The reference takes nothing from the session but the text: it tokenizes the text again,
        cuts the tokens into chunks again and runs the dense VQ forward (float64, canonical
        position ids 0..n-1) on each chunk. Compared: token ids, chunk layout, each checked
        chunk's token ids, position ids and codes, its logits, and (when every chunk is checked)
        the document logits. `indices` picks chunks (default: all). Counts no MACs.
        In exact mode everything must agree (logits within 1e-9); in fast mode this measures the
        divergence.
        """
        scratch = MacCounter()
        fresh_ids = tokenize(self.tokenizer, self.text).ids
        fresh_lengths = chunk_lengths(fresh_ids, self.policy, self.continues_word)
        fresh_starts = offsets(fresh_lengths)
        result = {"token_mismatch": int(fresh_ids != list(self.tokens.ids)),
                  "layout_mismatch": int(fresh_lengths != self.chunk_lengths),
                  "row_id_mismatches": 0, "position_mismatches": 0, "code_mismatches": 0,
                  "codes_checked": 0, "max_abs_logit_diff": 0.0}
        if result["layout_mismatch"]:
            indices = []
        indices = range(len(self.chunks)) if indices is None else indices
        fresh_pooled = {}
        for i in indices:
            mine = self.chunks[i]
            start, n = fresh_starts[i], fresh_lengths[i]
            ids = torch.tensor([self.cls_id, *fresh_ids[start : start + n], self.sep_id])
            ref = self.model.forward(ids, torch.arange(len(ids)), scratch)
            result["row_id_mismatches"] += int((mine.token_ids.cpu() != ids).sum())
            result["position_mismatches"] += int(
                (mine.position_ids.cpu() != torch.arange(len(ids))).sum())
            for a, b in zip(mine.layers, ref.layers, strict=True):
                result["code_mismatches"] += int((a.codes.long() != b.codes).sum())
                result["codes_checked"] += b.codes.numel()
            diff = self.model.head.logits(mine.pooled) - self.model.head.logits(ref.pooled)
            result["max_abs_logit_diff"] = max(result["max_abs_logit_diff"],
                                               float(diff.abs().max()))
            fresh_pooled[i] = ref.pooled
        if not result["layout_mismatch"] and len(fresh_pooled) == len(fresh_lengths):
            ref_doc = document_pooled([fresh_pooled[i] for i in range(len(fresh_lengths))],
                                      [n + 2 for n in fresh_lengths])
            diff = self.logits() - self.model.head.logits(ref_doc)
            result["max_abs_logit_diff"] = max(result["max_abs_logit_diff"],
                                               float(diff.abs().max()))
        return result
