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


def _answers(sessions: list[DocumentSession]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    return [(s.logits(), [layer.codes for chunk in s.chunks for layer in chunk.layers])
            for s in sessions]


def test_a_document_answers_the_same_in_any_company(model, tokenizer, monkeypatch):
    """With the float16 kernels (each row summed alone), a batched document's numbers are bit
    for bit those of its edits applied alone, whichever documents share its steps: the worker
    batches documents, and a restarted or rebalanced worker batches them differently.
    KERNEL_ROWS is lowered to 8 so that typed edits share kernel calls of more rows than one
    could take alone and hunks take oneDNN's many-row path beside them."""
    from incstream.engine.incremental import fast_chunk
    from incstream.engine.model import half_linear

    if not half_linear.half_available():
        pytest.skip("the float16 kernels do not build here (no C compiler)")
    mode = FastModeConfig(matmul="float16")
    docs = _docs("peps-typing.jsonl.gz", 3) + _docs("peps-hunks.jsonl.gz", 1)
    copies = [[DocumentSession(model, tokenizer, text, POLICY, mode=mode) for text, _ in docs]
              for _ in range(3)]
    engine = copies[0][0].engine
    assert engine.batches_alone_exact  # the worker batches documents by default then
    # float32 products (oneDNN) promise no row-alone sums: no batching by default
    assert not DocumentSession(model, tokenizer, "a few words", POLICY,
                               mode=FastModeConfig(matmul="float32")).engine.batches_alone_exact
    monkeypatch.setattr(half_linear, "KERNEL_ROWS", 8)
    monkeypatch.setattr(fast_chunk, "KERNEL_ROWS", 8)
    alone, together, rotating = copies
    big_steps = shared_steps = 0
    for r in range(6):
        edits = [(i, ops[r]) for i, (_, ops) in enumerate(docs) if r < len(ops)]
        for i, ops in edits:
            alone[i].apply_ops(ops)
        reports = apply_ops_batched([(together[i], ops) for i, ops in edits])
        # per layer, the rows each splice brought (rebuilt chunks took no shared call)
        splices = [u.rows_changed for rep in reports for u in rep.chunk_updates
                   if not u.rebuilt]
        layers = max((len(rows) for rows in splices), default=0)
        per_layer = [[rows[k] for rows in splices if k < len(rows)] for k in range(layers)]
        big_steps += any(n > 8 for counts in per_layer for n in counts)
        shared_steps += any(sum(n for n in counts if n <= 8) > 8 for counts in per_layer)
        # a different company each round: pairs that change with the round
        order = edits[r % len(edits):] + edits[: r % len(edits)]
        for pair in (order[:2], order[2:]):
            if pair:
                apply_ops_batched([(rotating[i], ops) for i, ops in pair])
        for a, b, c in zip(_answers(alone), _answers(together), _answers(rotating),
                           strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
            assert all(torch.equal(x, y) and torch.equal(x, z)
                       for x, y, z in zip(a[1], b[1], c[1], strict=True))
    assert big_steps and shared_steps  # both kinds of call were exercised
