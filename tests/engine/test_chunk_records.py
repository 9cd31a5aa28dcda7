"""Durable chunk records: a session brought back from them answers as the one that wrote them.

Exact mode: a record is the chunk's tokens, and the restored session equals the original in
its codes (logits within the exactness tolerance). Fast mode: the record keeps the stable
position ids and the codes, which depend on the edit history; the restored session has the
same codes and ids, and its answer matches the live session's (not a fresh fast build's,
which differs after a history of edits).
"""

from __future__ import annotations

import torch
from engine_streams import stream_docs
from exactness import TOL, assert_exact

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.state.activation_record import decode_chunk_record, encode_chunk_record, mode_tag

POLICY = ChunkPolicy(max_tokens=256)


def _typed(model, tokenizer, mode, edits: int) -> tuple[DocumentSession, list[dict]]:
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    events = [e for e in events if "ops" in e]
    session = DocumentSession(model, tokenizer, snapshot, POLICY, mode=mode)
    for event in events[:edits]:
        session.apply_ops(event["ops"])
    return session, events[edits:]


def _probs(session: DocumentSession) -> torch.Tensor:
    return torch.softmax(session.logits(), -1)


def test_fast_session_restored_from_records_has_the_same_codes_and_answer(model, tokenizer):
    live, _ = _typed(model, tokenizer, FastModeConfig(), 150)
    # Through the byte codec, as the worker stores them.
    tag = mode_tag("fast", "float32")
    records = [decode_chunk_record(encode_chunk_record(r, "m", tag), "m", tag)
               for r in live.chunk_records()]
    back = DocumentSession(model, tokenizer, live.text, POLICY, mode=FastModeConfig(),
                           records=records)
    assert back.restored_chunks == len(live.chunks) > 1
    for a, b in zip(live.chunks, back.chunks, strict=True):
        assert torch.equal(a.position_ids, b.position_ids)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.codes, lb.codes)
    assert float((_probs(live) - _probs(back)).abs().max()) < 1e-5
    # The history matters: a fresh fast build of the same text has other codes.
    fresh = DocumentSession(model, tokenizer, live.text, POLICY, mode=FastModeConfig())
    assert any(not torch.equal(la.codes, lf.codes)
               for a, f in zip(live.chunks, fresh.chunks, strict=True)
               for la, lf in zip(a.layers, f.layers, strict=True))


def test_restored_fast_session_goes_on_like_the_live_one(model, tokenizer):
    live, rest = _typed(model, tokenizer, FastModeConfig(), 100)
    back = DocumentSession(model, tokenizer, live.text, POLICY, mode=FastModeConfig(),
                           records=live.chunk_records())
    diffs, same_label = [], 0
    for event in rest[:40]:
        live.apply_ops(event["ops"])
        back.apply_ops(event["ops"])
        p, q = _probs(live), _probs(back)
        diffs.append(float((p - q).abs().max()))
        same_label += int(p.argmax()) == int(q.argmax())
    # Not bit for bit (the held softmax normalisers are re-derived, not stored), but close:
    # far inside the fast mode's own divergence from a fresh build.
    assert same_label == len(diffs) and max(diffs) < 0.01, diffs


def test_exact_session_restored_from_records_is_the_same_session(model, tokenizer):
    live, _ = _typed(model, tokenizer, "exact", 20)
    records = live.chunk_records()
    assert all(r.codes is None and r.positions is None for r in records)
    back = DocumentSession(model, tokenizer, live.text, POLICY, records=records)
    assert back.restored_chunks == len(live.chunks)
    # The restored chunks are fresh builds, which the live chunks equal (exact mode's
    # invariant): the same codes, logits within the exactness tolerance (the live session's
    # document vector is a running sum, so not bit for bit).
    for a, b in zip(live.chunks, back.chunks, strict=True):
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.codes, lb.codes)
    assert float((live.logits() - back.logits()).abs().max()) <= TOL
    assert_exact(back)


def test_missing_or_foreign_records_are_rebuilt(model, tokenizer):
    live, _ = _typed(model, tokenizer, FastModeConfig(), 30)
    records = live.chunk_records()
    tag = mode_tag("fast", "float32")
    blobs = [encode_chunk_record(r, "m", tag) for r in records]
    # One chunk's record lost, one written by another model: both chunks are built fresh.
    kept = [decode_chunk_record(b, "m", tag) for b in blobs[2:]]
    assert decode_chunk_record(blobs[1], "other-model", tag) is None
    back = DocumentSession(model, tokenizer, live.text, POLICY, mode=FastModeConfig(),
                           records=[r for r in kept if r is not None])
    assert back.restored_chunks == len(live.chunks) - 2
    assert float((_probs(live) - _probs(back)).abs().max()) < 0.5  # a valid answer, rebuilt
