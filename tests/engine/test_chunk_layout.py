"""Content-defined chunk layout: bounded sizes, cuts that depend only on nearby tokens."""

from __future__ import annotations

import random

from incstream.engine.incremental.chunks import ChunkPolicy, chunk_lengths, cut_candidates, offsets


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


def test_sizes_are_bounded_and_cover_the_document():
    pol = ChunkPolicy(max_tokens=66, cut_every=16)  # 64 content, no cut before 16
    assert chunk_lengths([], pol) == [0]
    assert chunk_lengths(random_ids(64, 0), pol) == [64]  # fits: one chunk
    for seed in range(5):
        lengths = chunk_lengths(random_ids(5000, seed), pol)
        assert sum(lengths) == 5000
        assert max(lengths) <= pol.max_content
        assert min(lengths[:-1]) >= pol.min_content
        assert len(lengths) > 5000 / pol.max_content


def test_cuts_resynchronise_after_an_edit():
    """An insertion near the start moves only the cuts near it; later cuts keep their tokens."""
    pol = ChunkPolicy(max_tokens=66, cut_every=16)
    ids = random_ids(4000, 1)
    edited = ids[:100] + random_ids(7, 2) + ids[103:]
    before = offsets(chunk_lengths(ids, pol))
    after = offsets(chunk_lengths(edited, pol))
    shift = 7 - 3
    later_before = {c + shift for c in before if c > 400}
    later_after = {c for c in after if c > 400 + shift}
    assert later_before == later_after


def test_no_cut_inside_a_word():
    ids = random_ids(3000, 3)
    continues = [False] * 30000
    for i in range(0, 30000, 2):
        continues[i] = True  # even ids continue a word in this made-up vocabulary
    import torch

    mask = torch.tensor(continues)
    for c in cut_candidates(ids, 8, mask):
        assert ids[c] % 2 == 1


def test_relayout_equals_a_fresh_cut_after_random_edits(tokenizer):
    """The session re-cuts only around an edit (engine.incremental.chunks.relayout); the result
    must be the
    layout a fresh cut of all tokens gets, for edits of every size, anywhere, in any text."""
    from incstream.engine.incremental.chunks import relayout, word_continuation_mask

    cw = word_continuation_mask(tokenizer)
    rng = random.Random(7)
    resynced = 0
    for _ in range(400):
        policy = ChunkPolicy(max_tokens=rng.choice([8, 12, 32, 64, 256]))
        vocab = rng.choice([5, 50, 2000, 28000])  # 5: periodic text with few candidates
        n = rng.randint(0, 2500)
        ids = [rng.randrange(1000, 1000 + vocab) for _ in range(n)]
        old = chunk_lengths(ids, policy, cw)
        at = rng.randint(0, n)
        deleted = rng.randint(0, min(n - at, rng.choice([0, 1, 5, 50, 600])))
        inserted = rng.choice([0, 1, 3, 40, 700])
        new_ids = (ids[:at] + [rng.randrange(1000, 1000 + vocab) for _ in range(inserted)]
                   + ids[at + deleted :])
        first, replaced, lengths = relayout(new_ids, old, at, deleted, inserted, policy, cw)
        assert old[:first] + lengths + old[first + replaced :] == chunk_lengths(
            new_ids, policy, cw)
        resynced += first + replaced < len(old)
    assert resynced > 50  # the scan usually stops long before the end of the document
