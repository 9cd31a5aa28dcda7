"""A document's incremental inference session: text -> tokens -> chunks -> VQ activations.

`DocumentSession` owns the current text, its tokens (with character offsets), the chunks and
each chunk's activations. `apply_ops` takes doc-edit/v1 character ops, turns them into a minimal
token edit (engine.edit_tokenizer), routes it to the chunk(s) it touches (engine.chunks) and
updates only what depends on it (engine.incremental_attention). Every MAC goes to the session's
MacCounter, the same counter type the dense paths use.

Invariant (tested, and checked by the benchmark): after every edit, each chunk's activations
equal `VQModel.forward` on that chunk's current token ids and position ids: same codes, logits
within 1e-4.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.chunks import ChunkPolicy, locate
from engine.edit_tokenizer import TokenEdit, apply_text_change, tokenize
from engine.head import document_pooled
from engine.incremental_attention import update_layer
from engine.macs import MacCounter
from engine.minilm import embed
from engine.positions import canonical, duplicates, insert_positions
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
    """A fresh chunk with canonical position ids (dense VQ forward)."""
    ids = torch.tensor([cls_id, *content, sep_id], dtype=torch.long)
    return model.forward(ids, torch.tensor(canonical(len(ids))), macs)


def update_chunk(model: VQModel, acts: ChunkActivations, start: int, deleted: int,
                 inserted: Sequence[int], macs: MacCounter,
                 rebase_duplicates: int) -> tuple[ChunkActivations, ChunkUpdate]:
    """Replace content[start:start+deleted] by `inserted` in one chunk, incrementally.

    Rows keep their position ids; inserted rows get ids from engine.positions. Past
    `rebase_duplicates` duplicate ids the chunk is rebuilt with canonical ids.
    """
    dev = model.device
    ids_old = acts.token_ids
    pos_old = acts.position_ids.tolist()
    n_old = len(pos_old)
    r0 = start + 1  # row of the first deleted token / insertion point ([CLS] is row 0)
    r1 = r0 + deleted
    new_pos = insert_positions(pos_old[r0 - 1], pos_old[r1], len(inserted))
    pos_list = pos_old[:r0] + new_pos + pos_old[r1:]
    ins = torch.tensor(list(inserted), dtype=torch.long, device=dev)
    ids = torch.cat([ids_old[:r0], ins, ids_old[r1:]])
    if duplicates(pos_list) > rebase_duplicates:
        fresh = model.forward(ids, torch.tensor(canonical(len(ids))), macs)
        return fresh, ChunkUpdate(rows_changed=[len(ids)] * model.cfg.layers, rebuilt=True)
    pos = torch.tensor(pos_list, dtype=torch.long, device=dev)
    old_src = torch.cat([torch.arange(r0, device=dev),
                         torch.full((len(inserted),), -1, dtype=torch.long, device=dev),
                         torch.arange(r1, n_old, device=dev)])
    changed = old_src < 0
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
        self.chunks: list[ChunkActivations] = []
        pos = 0
        for n in self.policy.split_lengths(len(self.tokens.ids)):
            self.chunks.append(self._build(self.tokens.ids[pos : pos + n]))
            pos += n

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
        """Route a token edit to its chunks, update them, rebalance sizes (split/merge).

        The session's token list must already be the edited one (apply_change does that); the
        chunks still hold the old tokens.
        """
        if edit.is_noop:
            return [], []
        pol = self.policy
        pieces = {p.index: p for p in locate(self.chunk_lengths, edit.start, edit.deleted)}
        first = min(pieces)
        # specs: ("keep", acts) | ("inc", acts, start, deleted, inserted) | ("build", content)
        #        | ("small", content, inc-spec)
        specs: list[tuple] = []
        for idx, acts in enumerate(self.chunks):
            piece = pieces.get(idx)
            if piece is None:
                specs.append(("keep", acts))
                continue
            ins = edit.inserted if idx == first else ()
            content = acts.token_ids[1:-1].tolist()
            new = content[: piece.start] + list(ins) + content[piece.start + piece.deleted :]
            inc = ("inc", acts, piece.start, piece.deleted, ins)
            if not new and len(self.chunks) > 1:
                continue
            if len(new) > pol.max_content:
                specs += [("build", part) for part in self._split(new)]
            elif len(new) < pol.min_content:
                specs.append(("small", new, inc))
            else:
                specs.append(inc)
        specs = self._merge_small(specs) if specs else [("build", [])]
        new_chunks: list[ChunkActivations] = []
        touched: list[int] = []
        updates: list[ChunkUpdate] = []
        for spec in specs:
            if spec[0] == "keep":
                new_chunks.append(spec[1])
                continue
            touched.append(len(new_chunks))
            if spec[0] == "inc":
                acts, update = update_chunk(self.model, spec[1], spec[2], spec[3], spec[4],
                                            self.macs, pol.rebase_duplicates)
            else:
                acts = self._build(spec[1])
                update = ChunkUpdate([len(acts.token_ids)] * self.model.cfg.layers, 0, True)
            new_chunks.append(acts)
            updates.append(update)
        self.chunks = new_chunks
        return touched, updates

    def _split(self, content: list[int]) -> list[list[int]]:
        out, pos = [], 0
        for n in self.policy.split_lengths(len(content)):
            out.append(content[pos : pos + n])
            pos += n
        return out

    def _merge_small(self, specs: list[tuple]) -> list[tuple]:
        """Merge each too-small chunk with its smaller neighbour (split evenly if too big)."""

        def content(spec: tuple) -> list[int]:
            if spec[0] == "keep":
                return spec[1].token_ids[1:-1].tolist()
            if spec[0] == "inc":
                _, acts, start, deleted, ins = spec
                old = acts.token_ids[1:-1].tolist()
                return old[:start] + list(ins) + old[start + deleted :]
            return spec[1]

        out = list(specs)
        i = 0
        while i < len(out):
            if out[i][0] != "small":
                i += 1
                continue
            if len(out) == 1:
                out[i] = out[i][2]  # a short document: nothing to merge with
                break
            left = i - 1 if i > 0 else None
            right = i + 1 if i + 1 < len(out) else None
            candidates = [j for j in (left, right) if j is not None]
            j = min(candidates, key=lambda c: len(content(out[c])))
            lo, hi = min(i, j), max(i, j)
            merged = content(out[lo]) + content(out[hi])
            if len(merged) <= self.policy.max_content:
                repl = [("build", merged)]
            else:
                repl = [("build", part) for part in self._split(merged)]
            out[lo : hi + 1] = repl
            i = lo + len(repl)
        return out

    # ----- checking
    def reference_check(self, indices: Sequence[int] | None = None) -> dict[str, float]:
        """Compare chunks with a dense VQ forward on their current ids and position ids.

        Returns max |logit diff| over the chunks' logits (and the document logits when all
        chunks are checked), code mismatches and codes compared. Counts no MACs.
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
        return {"max_abs_logit_diff": max_diff, "code_mismatches": mismatches,
                "codes_checked": checked}
