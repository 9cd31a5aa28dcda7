"""Labelled documents -> token chunks, exactly as a DocumentSession would first chunk them.

Training, evaluation and classification all see a document the way the incremental engine does:
WordPiece ids without special tokens (engine.incremental.edit_tokenizer.tokenize), cut by
engine.incremental.chunks.chunk_lengths (content-defined cuts) into chunks of [CLS] content
[SEP] with
canonical positions; the document's pooled vector is the token-count-weighted mean of its
chunks' pooled vectors.

For CPU budgets a document may be truncated to its first (keep="head") or last (keep="tail")
`max_tokens` content tokens. The cut is made on the TEXT (at a kept token's boundary), so the
incremental session, which re-tokenizes text, sees exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from incstream.engine.incremental.chunks import ChunkPolicy, chunk_lengths, word_continuation_mask
from incstream.engine.incremental.edit_tokenizer import tokenize


@dataclass
class DocChunks:
    """One document: its (possibly truncated) text and its chunks' token ids."""

    text: str
    chunks: list[torch.Tensor]  # each (n_c,) long: [CLS] content [SEP]

    @property
    def counts(self) -> list[int]:
        return [len(c) for c in self.chunks]


def truncate_text(tokenizer, text: str, max_tokens: int | None, keep: str = "head") -> str:
    """The prefix ("head") or suffix ("tail") of `text` holding `max_tokens` WordPiece tokens
    (all if None). A word split into pieces at the cut may lose or keep its pieces whole, so
    re-tokenizing gives at most `max_tokens` tokens (head) or about that many (tail)."""
    if max_tokens is None:
        return text
    toks = tokenize(tokenizer, text)
    if len(toks.ids) <= max_tokens:
        return text
    if keep == "tail":
        return text[toks.starts[len(toks.ids) - max_tokens] :]
    if keep != "head":
        raise ValueError(f"keep must be 'head' or 'tail', not {keep!r}")
    return text[: toks.ends[max_tokens - 1]]


def chunk_document(tokenizer, text: str, policy: ChunkPolicy, max_tokens: int | None = None,
                   keep: str = "head") -> DocChunks:
    """Truncate, tokenize and chunk one document like DocumentSession.__init__ does."""
    text = truncate_text(tokenizer, text, max_tokens, keep)
    ids = tokenize(tokenizer, text).ids
    chunks, pos = [], 0
    for n in chunk_lengths(ids, policy, word_continuation_mask(tokenizer)):
        piece = [tokenizer.cls_token_id, *ids[pos : pos + n], tokenizer.sep_token_id]
        chunks.append(torch.tensor(piece, dtype=torch.long))
        pos += n
    return DocChunks(text, chunks)


def chunk_documents(tokenizer, texts: Sequence[str], policy: ChunkPolicy,
                    max_tokens: int | None = None, keep: str = "head") -> list[DocChunks]:
    return [chunk_document(tokenizer, t, policy, max_tokens, keep) for t in texts]


def pad_chunks(chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a batch: ids (B, n) (pad id 0) and a validity mask (B, n) bool."""
    n = max(len(c) for c in chunks)
    ids = torch.zeros(len(chunks), n, dtype=torch.long)
    mask = torch.zeros(len(chunks), n, dtype=torch.bool)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = True
    return ids, mask
