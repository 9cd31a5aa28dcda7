"""A document's incremental inference session: text -> tokens -> chunks -> VQ activations.

`DocumentSession` owns the current text, its tokens (with character offsets), the chunks and
each chunk's activations. `apply_ops` takes doc-edit/v1 character ops, turns them into a minimal
token edit (engine.edit_tokenizer), re-cuts the tokens into chunks (engine.chunks: content-
defined, so only cuts near the edit move), keeps every chunk whose tokens are unchanged, and
updates the others incrementally (engine.incremental_attention) or rebuilds them. Every MAC goes
to the session's MacCounter, the same counter type the dense paths use.

Invariant (tested, and checked by the benchmark): after every edit the session equals a fresh
session built on the current text: the same chunk layout, and each chunk's activations equal
`VQModel.forward` on its token ids with canonical positions (same codes, logits within 1e-9).
So the answer never depends on the edit history, and a cache can be rebuilt from the text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.chunks import ChunkPolicy, chunk_lengths, offsets, word_continuation_mask
from engine.edit_tokenizer import TokenEdit, apply_text_change, tokenize
from engine.head import document_pooled
from engine.incremental_attention import update_layer
from engine.macs import MacCounter
from engine.minilm import embed
from engine.text_ops import TextChange, apply_ops
from engine.vq_model import ChunkActivations, VQModel


@dataclass
class ChunkUpdate:
    """What one chunk's update did: rows whose layer input changed, per layer."""

    rows_changed: list[int] = field(default_factory=list)
    searched: int = 0
    rebuilt: bool = False
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
    last `suffix` content tokens (engine.session.common_ends of old and new content).

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


class DocumentSession:
    """Incremental VQ inference state of one document."""

    def __init__(self, model: VQModel, tokenizer: Any, text: str = "",
                 policy: ChunkPolicy | None = None, macs: MacCounter | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy or ChunkPolicy()
        self.macs = macs if macs is not None else MacCounter()
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.tokens = tokenize(tokenizer, text)
        self.continues_word = word_continuation_mask(tokenizer)
        self.chunks: list[ChunkActivations] = []
        ids = self.tokens.ids
        for start, n in zip(*self._layout(ids), strict=True):
            self.chunks.append(self._build(ids[start : start + n]))

    def _layout(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(starts, lengths) of the chunks a fresh build of these tokens gets."""
        lengths = chunk_lengths(ids, self.policy, self.continues_word)
        return offsets(lengths), lengths

    # ----- reading
    @property
    def text(self) -> str:
        return self.tokens.text

    @property
    def chunk_lengths(self) -> list[int]:
        """Content tokens per chunk (without [CLS]/[SEP])."""
        return [len(c.token_ids) - 2 for c in self.chunks]

    def nbytes(self) -> int:
        """Memory held by the activations of all chunks (tokens and text not counted)."""
        return sum(c.nbytes() for c in self.chunks)

    def chunk_logits(self, index: int) -> torch.Tensor:
        return self.model.head.logits(self.chunks[index].pooled)

    def pooled(self) -> torch.Tensor:
        return document_pooled([c.pooled for c in self.chunks],
                               [len(c.token_ids) for c in self.chunks])

    def logits(self) -> torch.Tensor:
        return self.model.head.logits(self.pooled())

    # ----- editing
    def apply_ops(self, ops: Sequence[Any]) -> EditReport:
        new_text, change = apply_ops(self.text, ops)
        return self.apply_change(new_text, change)

    def apply_change(self, new_text: str, change: TextChange) -> EditReport:
        started = time.perf_counter()
        before = self.macs.as_dict()
        _, edit = apply_text_change(self.tokenizer, self.tokens, new_text, change)
        touched, updates = self.apply_token_edit(edit)
        after = self.macs.as_dict()
        delta = {k: after[k] - before[k] for k in after}
        return EditReport(edit, delta, touched, updates, time.perf_counter() - started)

    def _build(self, content: Sequence[int]) -> ChunkActivations:
        return build_chunk(self.model, self.cls_id, self.sep_id, content, self.macs)

    def apply_token_edit(self, edit: TokenEdit) -> tuple[list[int], list[ChunkUpdate]]:
        """Re-cut the edited tokens and bring each chunk up to date, reusing what is unchanged.

        The session's token list must already be the edited one (apply_change does that); the
        chunks still hold the old tokens. A new chunk that starts where an old chunk started
        (mapped across the edit) is that old chunk, kept as is when its tokens are unchanged and
        updated incrementally otherwise; any other new chunk is built.
        """
        if edit.is_noop:
            return [], []
        ids = self.tokens.ids
        old_starts = offsets(self.chunk_lengths)
        shift = len(edit.inserted) - edit.deleted
        edit_end = edit.start + edit.deleted  # in old coordinates
        by_new_start: dict[int, ChunkActivations] = {}
        for start, acts in zip(old_starts, self.chunks, strict=True):
            if start <= edit.start:
                by_new_start[start] = acts
            elif start >= edit_end:
                by_new_start[start + shift] = acts
        new_chunks: list[ChunkActivations] = []
        touched: list[int] = []
        updates: list[ChunkUpdate] = []
        for start, n in zip(*self._layout(ids), strict=True):
            content = ids[start : start + n]
            old = by_new_start.get(start)
            old_content = old.token_ids[1:-1].tolist() if old is not None else None
            if old_content == content:
                new_chunks.append(old)
                continue
            touched.append(len(new_chunks))
            prefix, suffix = common_ends(old_content or [], content)
            # Update in place when some rows keep their layer-0 input, else rebuild the chunk.
            kept = prefix + (suffix if old_content and len(old_content) == n else 0)
            if old is not None and kept >= max(1, n // 8):
                acts, update = update_chunk(self.model, old, content, prefix, suffix, self.macs)
            else:
                acts = self._build(content)
                update = ChunkUpdate([len(acts.token_ids)] * self.model.cfg.layers, 0, True)
            new_chunks.append(acts)
            updates.append(update)
        self.chunks = new_chunks
        return touched, updates

    # ----- checking
    def reference_check(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Compare chunks with a dense VQ forward on their current token ids.

        Returns max |logit diff| over the chunks' logits (and the document logits when all
        chunks are checked), code mismatches, codes compared, and whether the chunk layout
        differs from the one a fresh build of the current text gets. Counts no MACs.
        """
        indices = range(len(self.chunks)) if indices is None else indices
        scratch = MacCounter()
        max_diff = 0.0
        mismatches = checked = 0
        fresh_pooled = {}
        for i in indices:
            acts = self.chunks[i]
            ref = self.model.forward(acts.token_ids, acts.position_ids, scratch)
            for mine, theirs in zip(acts.layers, ref.layers, strict=True):
                mismatches += int((mine.codes != theirs.codes).sum())
                checked += mine.codes.numel()
            diff = (self.model.head.logits(acts.pooled) - self.model.head.logits(ref.pooled))
            max_diff = max(max_diff, float(diff.abs().max()))
            fresh_pooled[i] = ref.pooled
        if len(fresh_pooled) == len(self.chunks):
            ref_doc = document_pooled([fresh_pooled[i] for i in range(len(self.chunks))],
                                      [len(c.token_ids) for c in self.chunks])
            diff = self.logits() - self.model.head.logits(ref_doc)
            max_diff = max(max_diff, float(diff.abs().max()))
        layout_ok = self.chunk_lengths == self._layout(self.tokens.ids)[1]
        return {"max_abs_logit_diff": max_diff, "code_mismatches": mismatches,
                "codes_checked": checked, "layout_mismatch": int(not layout_ok)}
