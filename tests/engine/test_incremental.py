"""Incremental state == a fresh build of the current text after every edit (same tokens, layout,
positions and codes; logits within 1e-9)."""

from __future__ import annotations

import pytest
import torch
from engine_streams import stream_docs
from exactness import assert_exact

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.session import DocumentSession


def assert_same_as_fresh(session: DocumentSession) -> None:
    """The edited session is what a fresh build of its text gives: layout, codes, logits."""
    fresh = DocumentSession(session.model, session.tokenizer, session.text, session.policy)
    assert session.chunk_lengths == fresh.chunk_lengths
    for mine, theirs in zip(session.chunks, fresh.chunks, strict=True):
        assert torch.equal(mine.token_ids, theirs.token_ids)
        assert torch.equal(mine.position_ids, theirs.position_ids)
        for a, b in zip(mine.layers, theirs.layers, strict=True):
            assert torch.equal(a.codes, b.codes)
    assert float((session.logits() - fresh.logits()).abs().max()) <= 1e-9


def edit(session: DocumentSession, start: int, deleted: int, inserted: str):
    ops = [{"retain": start}, {"delete": deleted}, {"insert": inserted}]
    report = session.apply_ops(ops)
    assert_exact(session, report.touched)
    return report


TEXT = ("Abstract\n========\n\nThis PEP proposes a backwards compatible mechanism that allows "
        "__enter__() methods to skip the body of the associated with statement. The lack of "
        "this ability currently means the contextlib.contextmanager decorator is unable to "
        "fulfil its specification of being able to turn arbitrary code into a context manager "
        "by moving it into a generator function with a yield in the appropriate location.\n")


def test_edits_at_start_middle_end(model, tokenizer):
    s = DocumentSession(model, tokenizer, TEXT, ChunkPolicy(max_tokens=48))
    assert len(s.chunks) > 1
    edit(s, 0, 0, "Preface: ")  # insert at start
    edit(s, 0, 9, "")  # delete at start
    mid = len(s.text) // 2
    edit(s, mid, 0, " quite")
    edit(s, mid, 6, "")
    edit(s, mid - 10, 3, "XYZ")  # replace
    edit(s, len(s.text), 0, " Trailing words.")  # insert at end
    edit(s, len(s.text) - 16, 16, "")  # delete at end
    assert_exact(s)
    assert_same_as_fresh(s)


def test_rows_before_the_edit_keep_their_layer0_input(model, tokenizer):
    s = DocumentSession(model, tokenizer, "one two three four five six", ChunkPolicy(64))
    report = edit(s, 13, 0, " and a half")
    ins = len(report.token_edit.inserted)
    rows = len(s.chunks[0].token_ids)
    # [CLS] and "one two three" keep their input; the inserted rows and every row after them
    # (shifted to new canonical positions, [SEP] included) are recomputed at layer 0.
    assert report.chunk_updates[0].rows_changed[0] == rows - 4
    assert ins == 3 and not report.chunk_updates[0].rebuilt
    # Same length replacement: the rows after it keep their positions and their input.
    report = edit(s, 8, 5, "seven")
    assert report.chunk_updates[0].rows_changed[0] == 1


def test_empty_document_and_back(model, tokenizer):
    s = DocumentSession(model, tokenizer, "", ChunkPolicy(max_tokens=32))
    assert s.chunk_lengths == [0]
    assert_exact(s)
    edit(s, 0, 0, "hello world, this is a test of an empty start")
    edit(s, 0, len(s.text), "")
    assert s.chunk_lengths == [0]
    assert_exact(s)
    edit(s, 0, 0, "   ")  # whitespace only: no tokens, nothing to do
    assert s.logits().shape == (384,)


def test_edit_crossing_chunk_boundaries(model, tokenizer):
    s = DocumentSession(model, tokenizer, TEXT * 3, ChunkPolicy(max_tokens=40))
    n_chunks = len(s.chunks)
    # Delete a span covering several chunk boundaries (merges what is left too small).
    boundary = s.tokens.starts[sum(s.chunk_lengths[:2])]
    report = edit(s, boundary - 30, 120, "")
    assert len(report.touched) >= 1 and len(s.chunks) < n_chunks
    # A big insertion splits the chunk it lands in.
    report = edit(s, 50, 0, TEXT)
    assert len(report.touched) >= 2
    assert max(s.chunk_lengths) <= s.policy.max_content
    assert min(s.chunk_lengths[:-1]) >= s.policy.min_content
    assert_exact(s)
    assert_same_as_fresh(s)


@pytest.mark.slow
def test_hundreds_of_real_typing_edits_are_exact(model, tokenizer):
    """The first 250 consecutive real events of a PEP typed word by word, small chunks (the
    whole history, ~650 events, costs CI a minute and a half more: `incstream bench engine
    --mode exact` replays all of it)."""
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    s = DocumentSession(model, tokenizer, snapshot, ChunkPolicy(max_tokens=64))
    searched = rows = 0
    assert len(events) > 250
    for event in events[:250]:
        report = s.apply_ops(event["ops"])
        if report.touched:
            assert_exact(s, report.touched)
        for u in report.chunk_updates:
            searched += u.searched
            rows += sum(u.rows_changed)
    assert_exact(s)
    assert_same_as_fresh(s)
    assert rows > 0 and searched > 0


@pytest.mark.slow
def test_real_hunk_edits_are_exact(model, tokenizer):
    """Every event of the first two peps-hunks documents (159 diff hunks, some large; the
    benchmark replays all five).

    128-row chunks keep this well inside CI's budget; test_long_document and the benchmark
    cover the default 256."""
    total = 0
    for _, snapshot, events in stream_docs("peps-hunks.jsonl.gz", 2):
        s = DocumentSession(model, tokenizer, snapshot, ChunkPolicy(max_tokens=128))
        for event in events:
            report = s.apply_ops(event["ops"])
            total += 1
            if report.touched:
                assert_exact(s, report.touched)
        assert_exact(s)
        assert_same_as_fresh(s)
    assert total > 150


def test_long_document(model, tokenizer):
    """~5k tokens: an edit touches one chunk, and the document answer stays exact."""
    s = DocumentSession(model, tokenizer, TEXT * 60, ChunkPolicy(max_tokens=256))
    assert len(s.tokens.ids) > 4000
    report = edit(s, len(s.text) // 2, 0, " inserted words ")
    assert len(report.touched) == 1
    before = s.logits().clone()
    assert_exact(s)
    assert torch.isfinite(before).all()
