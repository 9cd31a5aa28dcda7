"""Edits of several documents updated in one batched step (one Q/K/V and one feed-forward
matmul per layer for all their changed rows) answer as the same edits applied one at a time."""

from __future__ import annotations

import pytest
import torch
from engine_streams import stream_docs
from exactness import assert_exact

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession, apply_ops_batched

POLICY = ChunkPolicy(max_tokens=128)


def _docs(name: str, n: int) -> list[tuple[str, list[list]]]:
    return [(snapshot, [e["ops"] for e in events if "ops" in e])
            for _, snapshot, events in stream_docs(name, n)]


@pytest.mark.parametrize("stream, n_docs, rounds", [("peps-typing.jsonl.gz", 3, 12),
                                                    ("peps-hunks.jsonl.gz", 2, 3)])
def test_fast_batch_equals_one_at_a_time(model, tokenizer, stream, n_docs, rounds):
    docs = _docs(stream, n_docs)
    alone = [DocumentSession(model, tokenizer, text, POLICY, mode=FastModeConfig())
             for text, _ in docs]
    batched = [DocumentSession(model, tokenizer, text, POLICY, mode=FastModeConfig())
               for text, _ in docs]
    for r in range(rounds):
        edits = [(i, ops[r]) for i, (_, ops) in enumerate(docs) if r < len(ops)]
        single = [alone[i].apply_ops(ops) for i, ops in edits]
        together = apply_ops_batched([(batched[i], ops) for i, ops in edits])
        for a, b in zip(single, together, strict=True):
            assert a.macs == b.macs  # each document is charged for its own rows
            assert a.touched == b.touched
    for a, b in zip(alone, batched, strict=True):
        assert a.text == b.text
        for ca, cb in zip(a.chunks, b.chunks, strict=True):
            assert torch.equal(ca.position_ids, cb.position_ids)
            for la, lb in zip(ca.layers, cb.layers, strict=True):
                assert torch.equal(la.codes, lb.codes)
        pa, pb = torch.softmax(a.logits(), -1), torch.softmax(b.logits(), -1)
        assert float((pa - pb).abs().max()) < 1e-5  # the batched matmuls round differently


def test_exact_sessions_in_a_batch_stay_exact(model, tokenizer):
    docs = _docs("peps-typing.jsonl.gz", 2)
    sessions = [DocumentSession(model, tokenizer, text, POLICY) for text, _ in docs]
    for r in range(3):
        apply_ops_batched([(s, ops[r]) for s, (_, ops) in zip(sessions, docs, strict=True)])
    for s in sessions:
        assert_exact(s)


def test_a_batch_takes_one_edit_per_document(model, tokenizer):
    s = DocumentSession(model, tokenizer, "one two three", POLICY, mode="fast")
    with pytest.raises(ValueError, match="one change per session"):
        apply_ops_batched([(s, [{"retain": 3}, {"insert": "!"}]),
                           (s, [{"retain": 4}, {"insert": "?"}])])
