"""What a chunk's durable record holds: enough to bring its activations back after a restart.

The hot activations of a chunk (q, k, v, softmax normalisers, codes, ...; ~15 KB a token in
fast mode, ~117 KB in exact mode) are too big to write on every edit. A record keeps only what
cannot be recomputed from the text:

- exact mode: nothing but the chunk's token ids. An exact chunk is a function of its tokens
  (canonical positions, nearest codes), so rebuilding it gives the same activations, bit for
  bit;
- fast mode: the token ids, the stable position ids and the codes of every layer and head
  (uint8): the part of the state that depends on the edit history. Everything else follows
  from them in one dense pass (engine.incremental.fast_chunk.restore_fast_chunk): a row's
  layer input is a function of its token, its position and its codes in the layers below.
  The held context slack is re-derived from the recomputed contexts, as a build does.

About 78 bytes a token in fast mode (4 id + 2 position + 72 codes for 6 layers x 12 heads).
state/activation_record.py turns records into bytes for RocksDB and the changelog.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkRecord:
    content: tuple[int, ...]  # the chunk's token ids without [CLS]/[SEP]
    positions: torch.Tensor | None = None  # (n,) int16, [CLS] and [SEP] rows included; fast
    codes: torch.Tensor | None = None  # (layers, n, heads) uint8; fast mode only
    edits: int = 0  # fast mode: updates since the chunk was last built canonically
    displacement: int = 0  # fast mode: max |position id - canonical index|

    @property
    def rows(self) -> int:
        return len(self.content) + 2
