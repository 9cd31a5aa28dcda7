"""Edited versions of training chunks, as the fast mode would hold them: the stability pairs.

A pair is a chunk x (canonical positions 0..n-1, as a fresh build sees it) and x' = x after one
to `max_edits` random edits, with the position ids the fast mode would give x' (stable ids:
engine.incremental.fast_chunk.stable_positions, the very function the engine runs; inserted rows
take ids after their left neighbour and share ids with the rows after them when there is no
room). Edits, drawn like the streams in ../shared/data: typing-sized insertions, deletions and
replacements of 1-4 tokens, and paragraph-sized hunks of 8-32 tokens; inserted tokens are drawn
from the same chunk, so they follow its vocabulary. Edits never touch [CLS] or [SEP].

The pair also says which rows of x' are "away from the edit": rows whose token and position id
are unchanged (`kept_src` in x, `kept_dst` in x'). Their layer-0 input is the same in x and x',
so any change of their codes comes only from attention to the edited rows: that is what the
stability objective penalizes (engine.training.train_adapted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from incstream.engine.incremental.fast_chunk import stable_positions

SMALL_EDIT = (1, 4)  # tokens inserted / deleted / replaced by a typing-sized edit
HUNK_EDIT = (8, 32)  # tokens of a paragraph-sized edit
HUNK_SHARE = 0.25  # fraction of edits that are hunks


@dataclass
class EditedChunk:
    ids: torch.Tensor  # (m,) long: [CLS] ... [SEP] after the edits
    positions: torch.Tensor  # (m,) long: the fast mode's stable position ids
    kept_src: torch.Tensor  # (k,) rows of the original chunk left untouched ...
    kept_dst: torch.Tensor  # (k,) ... and where they are in the edited one


def _span(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def edit_chunk(ids: torch.Tensor, gen: torch.Generator, max_edits: int = 3,
               shift_limit: int = 2, max_rows: int = 500) -> EditedChunk:
    """`ids` ([CLS] content [SEP], canonical positions) after 1..max_edits random edits."""
    cur_ids = ids.clone()
    pos = torch.arange(len(ids))
    origin = torch.arange(len(ids))  # row of the original chunk, or -1 (new or moved)
    for _ in range(_span(gen, 1, max_edits)):
        content = len(cur_ids) - 2
        if content < 2:
            break
        hunk = float(torch.rand((), generator=gen)) < HUNK_SHARE
        lo, hi = HUNK_EDIT if hunk else SMALL_EDIT
        kind = _span(gen, 0, 2)  # 0 insert, 1 delete, 2 replace
        n_del = 0 if kind == 0 else min(_span(gen, lo, hi), content - 1)
        n_ins = 0 if kind == 1 else _span(gen, lo, hi)
        if len(cur_ids) - n_del + n_ins > max_rows:
            n_ins = 0
        r0 = _span(gen, 1, content + 1 - n_del)  # first replaced row (1 = right after [CLS])
        r1 = r0 + n_del
        new = cur_ids[1:-1][torch.randint(content, (n_ins,), generator=gen)]
        pos, pushed = stable_positions(pos, r0, r1, n_ins, shift_limit)
        fresh = torch.full((n_ins,), -1, dtype=torch.long)
        right = origin[r1:].clone()
        right[:pushed] = -1  # pushed along: their position id changed
        origin = torch.cat([origin[:r0], fresh, right])
        cur_ids = torch.cat([cur_ids[:r0], new, cur_ids[r1:]])
    kept_dst = (origin >= 0).nonzero().squeeze(1)
    return EditedChunk(cur_ids, pos, origin[kept_dst], kept_dst)
