"""Tests that kill the mutants of the incremental update (issue 13, `./dev mutate`): the chunk
layout (engine.incremental.chunks), the session's edit (engine.incremental.session) and the exact
incremental attention (engine.incremental.incremental_attention).

The exactness tests compare codes and logits with a fresh build; a wrong incremental update can
leave those right for now and still break the next edit (a stale softmax reference, a context
quantized long ago, a carried row taken from the wrong place), or do right but needless work
(searches, rebased rows, rebuilt chunks, a layout re-cut further than the edit reaches). So these
tests check, on tiny random models, the whole per-layer state of an updated chunk against a
fresh dense forward of its tokens (with the invariants that make the next update exact), and
what the update did (rows changed, searches, rows recomputed whole, MACs, chunks kept, updated
or built, chunks re-cut) against what the edit requires, derived from fresh builds and layouts.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from exactness import assert_exact

from incstream.engine.incremental import chunks as chunks_mod
from incstream.engine.incremental import session as session_mod
from incstream.engine.incremental.chunks import (
    _MIX,
    _PRIME,
    ChunkPolicy,
    _next_cut,
    chunk_lengths,
    cut_candidates,
    cut_scores,
    offsets,
    relayout,
    window_scores,
    word_continuation_mask,
)
from incstream.engine.incremental.edit_tokenizer import TokenEdit
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.incremental_attention import (
    CANCEL_RATIO,
    REBASE_MARGIN,
    update_layer,
)
from incstream.engine.incremental.session import (
    ChunkUpdate,
    DocumentSession,
    ExactChunks,
    common_ends,
    update_chunk,
)
from incstream.engine.model.codebooks import MARGIN_SLACK, Codebooks
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import MiniLMConfig, random_minilm
from incstream.engine.model.vq_model import ChunkActivations, LayerState, VQModel

CLS, SEP = 101, 102


def tiny(qk_scale: float, seed: int, layers: int = 3, codes: int = 6) -> VQModel:
    cfg = MiniLMConfig(hidden=32, layers=layers, heads=2, ffn=64)
    gen = torch.Generator().manual_seed(seed)
    book = torch.randn(cfg.layers, cfg.heads, codes, cfg.head_dim, generator=gen,
                       dtype=torch.float64) * 0.3
    return VQModel(random_minilm(cfg, seed=seed, qk_scale=qk_scale), Codebooks.from_tensor(book),
                   ClassificationHead.identity(cfg.hidden))


# mild: codes flip often; peaked: scores spread over hundreds (rebase and cancellation paths)
MODELS = {"mild": tiny(0.05, 1), "peaked": tiny(2.0, 2)}


def elsewhere_by_default():
    """Make the process's default device one the model is not on ("meta": shapes only) while
    an update runs: an update must allocate on its inputs' device (a worker that calls
    torch.set_default_device("cuda") must not get half of a CPU chunk on the GPU)."""
    return torch.device("meta")


def fresh(model: VQModel, content) -> ChunkActivations:
    ids = torch.tensor([CLS, *content, SEP], dtype=torch.long)
    return model.forward(ids, torch.arange(len(ids)), MacCounter())


def brute_ends(old, new) -> tuple[int, int]:
    """Longest common prefix, then the longest common suffix of what is left (independent)."""
    limit = min(len(old), len(new))
    prefix = next((i for i in range(limit) if old[i] != new[i]), limit)
    suffix = 0
    while (suffix < limit - prefix
           and old[len(old) - 1 - suffix] == new[len(new) - 1 - suffix]):
        suffix += 1
    return prefix, suffix


# Internal float64 state after chains of updates (contexts of peaked attention drift from the
# dense ones by up to ~6e-9 here); any mutant that matters is off by far more.
STATE_TOL = 1e-7


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = STATE_TOL) -> None:
    assert a.shape == b.shape, what
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs diff {err}"


def assert_layer_state(model: VQModel, layer: int, a: LayerState, a_out: torch.Tensor,
                       b: LayerState, b_out: torch.Tensor) -> None:
    """Layer state `a` (output `a_out`) of an incremental update equals the dense `b`
    (`b_out`), and its bookkeeping satisfies what the next update relies on."""
    where = f"layer {layer}"
    for name in ("x", "q", "k", "v"):
        close(getattr(a, name), getattr(b, name), f"{where} {name}")
    assert torch.equal(a.codes.long(), b.codes), where
    # Softmax state: N_i, D_i = sum_j e^(s_ij - m_i) (v_j, 1) with the row's own reference
    # m_i, and no score more than REBASE_MARGIN above it (else e^x loses the old terms).
    s = torch.einsum("ihd,jhd->ihj", b.q, b.k) / math.sqrt(model.cfg.head_dim)
    assert bool((s.amax(-1) <= a.m + REBASE_MARGIN + 1e-9).all()), where
    e = torch.exp(s - a.m.unsqueeze(-1))
    den = e.sum(-1)
    assert float(((a.den - den).abs() / den).max()) <= STATE_TOL, f"{where} den"
    close(a.num / a.den.unsqueeze(-1), b.num / b.den.unsqueeze(-1), f"{where} context")
    close(a.num / den.unsqueeze(-1), torch.einsum("ihj,jhd->ihd", e, b.v) / den.unsqueeze(-1),
          f"{where} num")
    # Codes and margins are those of ctx_q (the context at the last search), and ctx_q is
    # still within margin/2 of the context (so skipping the search was exact), unless it is
    # the context itself (searched now).
    codes, margin = model.codebooks.nearest_all(layer, a.ctx_q, MacCounter())
    assert torch.equal(codes, a.codes.long()), where
    close(margin, a.margin, f"{where} margin", 1e-10)
    drift = (b.num / b.den.unsqueeze(-1) - a.ctx_q).norm(dim=-1)
    assert bool(((drift < a.margin / 2 - MARGIN_SLACK) | (drift <= STATE_TOL)).all()), where
    close(a_out, b_out, f"{where} output")


def assert_chunk_state(model: VQModel, acts: ChunkActivations) -> None:
    """Every per-layer tensor of a chunk equals a fresh dense forward of its token ids."""
    ref = fresh(model, acts.token_ids[1:-1].tolist())
    assert torch.equal(acts.token_ids.cpu(), ref.token_ids)
    assert torch.equal(acts.position_ids.cpu(), ref.position_ids)
    assert len(acts.layers) == len(ref.layers)
    for layer, (a, b) in enumerate(zip(acts.layers, ref.layers, strict=True)):
        nxt = acts.layers[layer + 1].x if layer + 1 < len(acts.layers) else acts.out
        ref_nxt = ref.layers[layer + 1].x if layer + 1 < len(ref.layers) else ref.out
        assert_layer_state(model, layer, a, nxt, b, ref_nxt)
    close(acts.out, ref.out, "out")


def old_sources(n_old: int, prefix: int, suffix: int, inserted: int) -> torch.Tensor:
    """The old row each new row continues (-1: inserted), for one splice."""
    return torch.tensor(list(range(prefix + 1)) + [-1] * inserted
                        + list(range(n_old - 1 - suffix, n_old)))


def expected_layer(model: VQModel, layer: int, a: LayerState, b: LayerState, src: torch.Tensor,
                   changed: torch.Tensor) -> tuple[dict, MacCounter, torch.Tensor]:
    """What update_layer must do to bring old state `a` to the dense state `b` of the new rows
    (`src`: the old row each new row continues, -1 inserted; `changed`: rows whose input
    changed), derived from `b` (the true scores, contexts and codes) and what `a` stored (row
    references, denominators, margins, last-quantized contexts): the UpdateStats, the MACs, and
    the rows whose output changes (input or code)."""
    cfg = model.cfg
    heads, d, hidden = cfg.heads, cfg.head_dim, cfg.hidden
    n_new, n_old = len(src), a.x.shape[0]
    inserted = src < 0
    carried = ~inserted
    csrc = src[carried]
    macs = MacCounter()
    stable = ~changed
    n_stable = int(stable.sum())
    kept_old = torch.zeros(n_old, dtype=torch.bool)
    kept_old[src[stable]] = True
    n_terms = int(changed.sum()) + int((~kept_old).sum())
    stats = {"changed_in": int(changed.sum()), "removed": int((~kept_old).sum()), "rebased": 0,
             "min_margin_skipped": math.inf}
    full = changed.clone()
    if n_terms and n_stable:
        if n_terms >= n_new:  # correcting every row would cost more: all rows whole
            full[:] = True
        else:  # rows whose reference is exceeded or whose denominator cancels: rebased
            ss = src[stable]
            s = torch.einsum("ihd,jhd->ihj", b.q[stable], b.k) / math.sqrt(d)
            den_now = torch.exp(s - a.m[ss].unsqueeze(-1)).sum(-1)
            bad = den_now < a.den[ss] * CANCEL_RATIO
            if changed.any():
                bad |= s[:, :, changed].amax(-1) > a.m[ss] + REBASE_MARGIN
            full[stable.nonzero().squeeze(1)[bad.any(-1)]] = True
            stats["rebased"] = int(bad.any(-1).sum())
            macs.add("attn_scores", n_stable * n_terms * heads * d)
            macs.add("attn_values", n_stable * n_terms * heads * d)
    macs.add("attn_scores", int(full.sum()) * n_new * heads * d)
    macs.add("attn_values", int(full.sum()) * n_new * heads * d)
    macs.add("linear", int(changed.sum()) * 3 * hidden * hidden)
    searched = int(inserted.sum()) * heads
    if n_terms:  # a carried (row, head) is searched unless its context moved < margin/2
        ctx = b.num[carried] / b.den[carried].unsqueeze(-1)
        slack = a.margin[csrc] / 2 - (ctx - a.ctx_q[csrc]).norm(dim=-1)
        searched += int((slack <= MARGIN_SLACK).sum())
        if (slack > MARGIN_SLACK).any():
            stats["min_margin_skipped"] = float(slack[slack > MARGIN_SLACK].min())
    macs.add("codebook_search", searched * model.codebooks.k * d)
    moved = torch.zeros(n_new, dtype=torch.bool)
    moved[carried] = (b.codes[carried] != a.codes[csrc].long()).any(-1)
    out_changed = changed | moved
    stats.update(full_rows=int(full.sum()), searched=searched,
                 code_changes=int((moved & ~changed).sum()), changed_out=int(out_changed.sum()))
    macs.add("linear", int(out_changed.sum()) * 2 * hidden * cfg.ffn)
    macs.add_adds(int(out_changed.sum()) * heads * hidden)
    return stats, macs, out_changed


def add_macs(total: MacCounter, part: MacCounter) -> None:
    for category, n in part.macs.items():
        total.add(category, n)
    total.add_adds(part.adds)


def expected_update(model: VQModel, old: ChunkActivations, new_content, prefix: int,
                    suffix: int) -> dict:
    """What an exact incremental update of `old` to `new_content` must do (expected_layer per
    layer): at layer 0 the inserted rows and the rows whose canonical position moved change."""
    ref = fresh(model, new_content)
    n_old, n_new = len(old.token_ids), len(ref.token_ids)
    src = old_sources(n_old, prefix, suffix, len(new_content) - prefix - suffix)
    carried = src >= 0
    changed = ~carried
    changed[carried] = old.position_ids[src[carried]] != torch.arange(n_new)[carried]
    out = {"rows_changed": [], "searched": 0, "full_rows": 0, "rebased": 0,
           "min_skip_slack": math.inf, "macs": MacCounter(), "layers": []}
    for layer in range(model.cfg.layers):
        out["rows_changed"].append(int(changed.sum()))
        stats, macs, changed = expected_layer(model, layer, old.layers[layer], ref.layers[layer],
                                              src, changed)
        for key in ("searched", "full_rows", "rebased"):
            out[key] += stats[key]
        out["min_skip_slack"] = min(out["min_skip_slack"], stats["min_margin_skipped"])
        add_macs(out["macs"], macs)
        out["layers"].append(stats)
    return out


def assert_slack(got: float, expected: float) -> None:
    if math.isinf(expected):
        assert math.isinf(got) and got > 0
    else:
        assert abs(got - expected) <= 1e-9, (got, expected)


def check_update(model: VQModel, old: ChunkActivations, new_content,
                 monkeypatch: pytest.MonkeyPatch) -> ChunkActivations:
    """update_chunk(old -> new_content) equals a fresh build, did what it must and no more
    (per layer too: update_layer's stats), and left the old chunk as it was."""
    snapshot = copy.deepcopy(old)
    prefix, suffix = brute_ends(old.token_ids[1:-1].tolist(), list(new_content))
    expected = expected_update(model, old, list(new_content), prefix, suffix)
    layer_stats = []

    def spy(*args, **kwargs):
        result = update_layer(*args, **kwargs)
        layer_stats.append(result[3])
        return result

    macs = MacCounter()
    with monkeypatch.context() as patch:
        patch.setattr(session_mod, "update_layer", spy)
        with elsewhere_by_default():
            acts, report = update_chunk(model, old, list(new_content), prefix, suffix, macs)
    assert_chunk_state(model, acts)
    assert report.rows_changed == expected["rows_changed"]
    assert report.searched == expected["searched"]
    assert report.full_rows == expected["full_rows"]
    assert report.rebased == expected["rebased"]
    assert not report.rebuilt and not report.refreshed
    assert_slack(report.min_skip_slack, expected["min_skip_slack"])
    assert macs.as_dict() == expected["macs"].as_dict()
    assert len(layer_stats) == model.cfg.layers
    for stats, want in zip(layer_stats, expected["layers"], strict=True):
        got = {k: getattr(stats, k) for k in want if k != "min_margin_skipped"}
        assert got == {k: v for k, v in want.items() if k != "min_margin_skipped"}
        assert_slack(stats.min_margin_skipped, want["min_margin_skipped"])
    for name, t in vars(old).items():  # the old chunk is left as it was
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, getattr(snapshot, name)), name
    for la, lb in zip(old.layers, snapshot.layers, strict=True):
        for name, t in vars(la).items():
            assert torch.equal(t, getattr(lb, name)), name
    return acts


# ----- common_ends


def test_common_ends_equals_brute_force():
    rng = random.Random(5)
    cases = [([], []), ([1], []), ([], [1]), ([1, 2], [1, 2]), ([1, 1], [1]), ([1], [1, 1]),
             ([1, 2, 1], [1]), ([3, 1, 2], [4, 1, 2]), ([1, 2, 3], [1, 2, 4]),
             ([1, 2, 3], [1, 5, 3]), ([2, 2, 2, 2], [2, 2])]
    for _ in range(400):
        cases.append(([rng.randrange(3) for _ in range(rng.randint(0, 7))],
                      [rng.randrange(3) for _ in range(rng.randint(0, 7))]))
    for old, new in cases:
        prefix, suffix = common_ends(old, new)
        assert (prefix, suffix) == brute_ends(old, new), (old, new)
        assert prefix + suffix <= min(len(old), len(new))


# ----- update_chunk: one splice, against a fresh build and what the edit requires


def random_content(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(2000, 2000 + vocab) for _ in range(n)]


def splice(rng: random.Random, content: list[int], vocab: int) -> list[int]:
    kind = rng.choice(["insert", "delete", "replace", "same_length", "start", "end"])
    n = len(content)
    at = rng.randint(0, n)
    if kind == "start":
        at = 0
    if kind == "end":
        at = n
    deleted = 0 if kind == "insert" else rng.randint(0, min(n - at, 6))
    inserted = {"delete": 0, "same_length": deleted}.get(kind, rng.randint(0, 6))
    return content[:at] + random_content(rng, inserted, vocab) + content[at + deleted:]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_update_chunk_chains_equal_fresh_builds_and_do_only_what_is_needed(kind, monkeypatch):
    model = MODELS[kind]
    rng = random.Random(11 if kind == "mild" else 12)
    for _ in range(12):
        vocab = rng.choice([3, 40])
        content = random_content(rng, rng.randint(1, 24), vocab)
        acts = fresh(model, content)
        for _ in range(4):  # each update starts from an incrementally updated chunk
            new = splice(rng, content, vocab)
            if new == content:
                continue
            acts = check_update(model, acts, new, monkeypatch)
            content = new



# ----- chunk layout (engine.incremental.chunks)
#
# The layout of a text is part of the answer: a document's logits are the token-weighted mean
# over its chunks, and the codebooks and head were trained on chunks cut this way
# (engine.training.train_data). So the cut rule itself is pinned here, written out again in
# plain Python from the module docstring, not only its properties.


def py_scores(ids, continues=None) -> list[int]:
    """cut_scores, in Python integers: a hash of the three tokens ending at c (zeros before the
    text), _PRIME (never a cut) inside a word and at c = 0."""
    out = []
    for c, t in enumerate(ids):
        a = ids[c - 2] if c >= 2 else 0
        b = ids[c - 1] if c >= 1 else 0
        h = (a * _MIX[0] + b * _MIX[1] + t * _MIX[2]) % _PRIME
        h = h * 48_271 % _PRIME
        if c == 0 or (continues is not None and continues[t]):
            h = _PRIME
        out.append(h)
    return out


def py_lengths(ids, policy: ChunkPolicy, continues=None) -> list[int]:
    """chunk_lengths, written from the rule: the first candidate (score = 0 mod cut_spacing,
    not inside a word) at least min_content into the chunk and at most max_content, else the
    first lowest score in that range."""
    n, lo_n, hi_n = len(ids), policy.min_content, policy.max_content
    scores = py_scores(ids, continues)
    lengths, start = [], 0
    while n - start > hi_n:
        window = range(start + lo_n, start + hi_n + 1)
        cands = [c for c in window if scores[c] < _PRIME and scores[c] % policy.cut_spacing == 0]
        cut = cands[0] if cands else min(window, key=lambda c: (scores[c], c))
        lengths.append(cut - start)
        start = cut
    return [*lengths, n - start]


def test_cut_scores_are_the_documented_hash(tokenizer):
    rng = random.Random(3)
    cw = word_continuation_mask(tokenizer)
    for empty in (cut_scores([]), cut_scores([], cw)):  # (n,) int64, also for no tokens
        assert empty.shape == (0,) and empty.dtype == torch.long
    for n in (1, 2, 3, 50):
        ids = [rng.randrange(0, len(cw)) for _ in range(n)]
        assert cut_scores(ids).tolist() == py_scores(ids)
        assert cut_scores(ids, cw).tolist() == py_scores(ids, cw)
        assert cut_scores(ids).dtype == torch.long
    ids = [rng.randrange(1000, 30000) for _ in range(300)]
    for lo, hi in ((0, 300), (1, 40), (2, 2), (3, 120), (150, 300)):
        assert window_scores(ids, lo, hi, cw).tolist() == py_scores(ids, cw)[lo:hi]
    for every in (1, 2, 7, 95):
        expected = [c for c, h in enumerate(py_scores(ids, cw)) if h < _PRIME and h % every == 0]
        assert cut_candidates(ids, every, cw) == expected
    assert cut_candidates(ids, 1) == list(range(1, 300))  # every index but 0 without a mask


class StubTokenizer:
    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]


def test_word_continuation_mask_marks_wordpiece_continuations(tokenizer, monkeypatch):
    monkeypatch.setattr(chunks_mod, "_WORD_PIECE_MASKS", {})  # computed here, not cached
    mask = word_continuation_mask(tokenizer)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert mask.dtype == torch.bool and mask.shape == (len(tokenizer),)
    assert mask.tolist() == [t.startswith("##") for t in vocab]
    assert 1000 < int(mask.sum()) < len(vocab) // 2
    assert word_continuation_mask(tokenizer) is mask  # computed once per tokenizer
    other = StubTokenizer(["[CLS]", "##ing", "run", "#", "a##", "##"])
    assert word_continuation_mask(other).tolist() == [False, True, False, False, False, True]
    assert word_continuation_mask(tokenizer) is mask  # each tokenizer has its own


def test_offsets():
    assert offsets([]) == []
    assert offsets([0]) == [0]
    assert offsets([3, 1, 4]) == [0, 3, 4]


def test_next_cut_takes_the_first_candidate_in_range_else_the_first_lowest_score():
    pol = ChunkPolicy(max_tokens=22, min_fraction=0.25)  # content 5..20 tokens
    assert (pol.min_content, pol.max_content) == (5, 20)
    base, start = 7, 10  # scores cover tokens 7.. ; the chunk starts at 10: range [15, 30]
    scores = torch.tensor([50] * 40)
    scores[30 - base] = 3
    scores[16 - base] = 3  # two lowest: the first one wins
    scores[14 - base] = 1  # lower, but outside the range (before the minimum)
    scores[31 - base] = 0  # lower, but outside the range (after the maximum)
    assert _next_cut(scores, [], start, base, pol) == 16
    assert _next_cut(scores, [12, 14, 31, 40], start, base, pol) == 16  # no candidate in range
    assert _next_cut(scores, [14, 15, 30], start, base, pol) == 15  # range bounds included
    assert _next_cut(scores, [14, 30, 31], start, base, pol) == 30
    assert _next_cut(scores, [2, 20, 22], start, base, pol) == 20
    flat = torch.tensor([9] * 40)
    assert _next_cut(flat, [], start, base, pol) == 15
    flat[30 - base] = 8
    assert _next_cut(flat, [], start, base, pol) == 30  # the last token of the range counts


def test_chunk_lengths_follow_the_rule(tokenizer):
    cw = word_continuation_mask(tokenizer)
    rng = random.Random(4)
    for max_tokens, every in ((12, None), (22, 3), (40, None), (64, 16), (256, None)):
        pol = ChunkPolicy(max_tokens=max_tokens, cut_every=every)
        for vocab in (3, 60, 25000):
            n = rng.randint(0, 12 * max_tokens)
            ids = [rng.randrange(1000, 1000 + vocab) for _ in range(n)]
            assert chunk_lengths(ids, pol, cw) == py_lengths(ids, pol, cw)
            assert chunk_lengths(ids, pol) == py_lengths(ids, pol)
        m = pol.max_content
        assert chunk_lengths(list(range(1000, 1000 + m)), pol, cw) == [m]
        two = chunk_lengths(list(range(1000, 1001 + m)), pol, cw)
        assert len(two) == 2 and sum(two) == m + 1


def expected_relayout(new_ids, old_lengths, at, deleted, inserted, policy, cw):
    """(first, replaced, lengths) of relayout, from fresh layouts: re-cut from the first old
    chunk whose decision range [start + min, start + max] reaches the edit, up to the first new
    cut that is an old cut (shifted) with unchanged scores from there on."""
    new_lengths = chunk_lengths(new_ids, policy, cw)
    if len(new_ids) <= policy.max_content or len(old_lengths) == 1:
        return 0, len(old_lengths), new_lengths
    old_starts = offsets(list(old_lengths))
    first = next((k for k, s in enumerate(old_starts) if s + policy.max_content >= at),
                 len(old_lengths) - 1)
    delta = inserted - deleted
    old_cut_at = {s + delta: k for k, s in enumerate(old_starts)
                  if k > first and s + delta >= at + inserted + 2}
    new_starts = offsets(new_lengths)
    i = new_starts.index(old_starts[first])
    for j in range(i + 1, len(new_starts)):
        if new_starts[j] in old_cut_at:
            return first, old_cut_at[new_starts[j]] - first, new_lengths[i:j]
    return first, len(old_lengths) - first, new_lengths[i:]


def test_relayout_recuts_exactly_the_chunks_the_edit_can_move(tokenizer):
    cw = word_continuation_mask(tokenizer)
    rng = random.Random(8)
    stopped_early = 0
    for trial in range(300):
        policy = ChunkPolicy(max_tokens=rng.choice([8, 12, 32, 64]),
                             cut_every=rng.choice([None, None, 3]))
        vocab = rng.choice([4, 60, 25000])
        n = rng.randint(0, 1200)
        ids = [rng.randrange(1000, 1000 + vocab) for _ in range(n)]
        old = chunk_lengths(ids, policy, cw)
        if trial % 3 == 0 and len(old) > 2:  # an edit right at / next to a cut
            at = offsets(old)[rng.randrange(1, len(old))] + rng.choice([-2, -1, 0, 1, 2])
            at = min(max(at, 0), n)
        else:
            at = rng.randint(0, n)
        deleted = rng.randint(0, min(n - at, rng.choice([0, 1, 3, 40, 400])))
        inserted = rng.choice([0, 1, 2, 3, 40, 300])
        new_ids = (ids[:at] + [rng.randrange(1000, 1000 + vocab) for _ in range(inserted)]
                   + ids[at + deleted:])
        got = relayout(new_ids, old, at, deleted, inserted, policy, cw)
        assert got == expected_relayout(new_ids, old, at, deleted, inserted, policy, cw)
        stopped_early += got[0] + got[1] < len(old)
    assert stopped_early > 50


def test_relayout_scores_only_near_the_edit(tokenizer, monkeypatch):
    """Locality: an edit in a long document hashes a bounded window, not the document."""
    cw = word_continuation_mask(tokenizer)
    rng = random.Random(9)
    policy = ChunkPolicy(max_tokens=32)
    ids = [rng.randrange(1000, 26000) for _ in range(20000)]
    old = chunk_lengths(ids, policy, cw)
    windows = []
    real = chunks_mod.window_scores

    def spy(ids_, lo, hi, continues_word=None):
        windows.append((lo, hi))
        return real(ids_, lo, hi, continues_word)

    monkeypatch.setattr(chunks_mod, "window_scores", spy)
    at = 10000
    new_ids = ids[:at] + [4242, 4243, 4244] + ids[at + 1:]
    first, replaced, lengths = relayout(new_ids, old, at, 1, 3, policy, cw)
    assert old[:first] + lengths + old[first + replaced:] == chunk_lengths(new_ids, policy, cw)
    assert windows and replaced <= 6
    # a few chunks' worth of tokens around the edit (the look-ahead is a tuning choice), not
    # the 10000 tokens after it
    assert sum(hi - lo for lo, hi in windows) <= 40 * policy.max_content
    assert min(lo for lo, _ in windows) >= at - 2 * policy.max_content
    assert max(hi for _, hi in windows) <= at + 40 * policy.max_content


# ----- ExactChunks: update in place or rebuild


def test_exact_chunks_update_only_when_enough_rows_keep_their_input():
    """Rows kept at layer 0: the common prefix, plus the common suffix when the length is the
    same (else the suffix moves to new positions). Fewer than max(1, n // 8): rebuild."""
    model = MODELS["mild"]
    engine = ExactChunks(model)
    rng = random.Random(2)

    def case(n_old: int, n: int, prefix: int, suffix: int) -> bool:
        old_content = random_content(rng, n_old, 50)
        new = (old_content[:prefix] + random_content(rng, n - prefix - suffix, 50)
               + old_content[n_old - suffix:])
        old = fresh(model, old_content)
        macs = MacCounter()
        done = engine.update(old, new, prefix, suffix, macs)
        if done is None:
            assert macs.total == 0
            return False
        acts, report = done
        assert_chunk_state(model, acts)
        assert isinstance(report, ChunkUpdate) and not report.rebuilt
        assert macs.total > 0
        return True

    assert not case(7, 7, 0, 0) and case(7, 7, 1, 0) and case(7, 8, 1, 0)  # max(1, 0) = 1
    assert not case(20, 20, 1, 0) and case(20, 20, 2, 0)  # 20 // 8 = 2
    assert not case(24, 24, 2, 0) and case(24, 24, 3, 0)  # 24 // 8 = 3
    assert case(24, 24, 0, 3) and case(24, 24, 1, 2)  # same length: the suffix counts
    assert not case(23, 24, 0, 3) and not case(25, 24, 2, 20)  # else it does not
    assert case(25, 24, 3, 20)
    assert not case(16, 16, 0, 1) and case(16, 16, 0, 2)
    acts = engine.build(torch.tensor([CLS, 2001, 2002, SEP]), macs := MacCounter())
    assert_chunk_state(model, acts)
    reference = MacCounter()
    model.forward(torch.tensor([CLS, 2001, 2002, SEP]), torch.arange(4), reference)
    assert macs.as_dict() == reference.as_dict()


# ----- DocumentSession.apply_token_edit: which chunks are kept, updated, built

WORDS = ["alpha", "beta", "gamma", "x", "incremental", "the", "of", "42", ".", ",", "(", ")",
         "sequential", "é", "\n"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def check_session_edit(s: DocumentSession, ops):
    """Apply ops and check the edit against the rule, from fresh layouts and builds: the layout
    is re-cut from the first chunk the edit can move to the first re-synchronised cut; every
    other chunk is the same object; in the re-cut region a new chunk starting where an old one
    started (mapped across the edit) is that chunk, kept when its tokens are the same and else
    updated (when ExactChunks says so, by exactly the update expected_update derives) or built;
    any other new chunk is built. MACs: the sum of those updates and builds."""
    model = s.model
    old_chunks, old_lengths, old_ids = list(s.chunks), s.chunk_lengths, list(s.tokens.ids)
    expected_macs = MacCounter()
    plan = []

    report = s.apply_ops(ops)
    e = report.token_edit
    new_ids = list(s.tokens.ids)
    assert new_ids == old_ids[:e.start] + list(e.inserted) + old_ids[e.start + e.deleted:]
    if e.is_noop:
        assert report.touched == [] and report.chunk_updates == []
        assert s.chunk_lengths == old_lengths
        assert all(a is b for a, b in zip(s.chunks, old_chunks, strict=True))
        assert report.macs["total"] == 0
        return report
    first, replaced, lengths = expected_relayout(new_ids, old_lengths, e.start, e.deleted,
                                                 len(e.inserted), s.policy, s.continues_word)
    assert s.chunk_lengths == old_lengths[:first] + lengths + old_lengths[first + replaced:]
    assert len(s.chunks) == len(s.chunk_lengths)
    assert all(a is b for a, b in zip(s.chunks[:first], old_chunks[:first], strict=True))
    after = len(old_lengths) - first - replaced
    assert all(a is b for a, b in zip(s.chunks[len(s.chunks) - after:],
                                      old_chunks[first + replaced:], strict=True))
    old_starts = offsets(old_lengths)
    shift = len(e.inserted) - e.deleted
    by_new_start = {}
    for k in range(first, first + replaced):
        if old_starts[k] <= e.start:
            by_new_start[old_starts[k]] = old_chunks[k]
        elif old_starts[k] >= e.start + e.deleted:
            by_new_start[old_starts[k] + shift] = old_chunks[k]
    start = offsets(old_lengths)[first] if first < len(old_lengths) else 0
    for i, n in enumerate(lengths):
        content = new_ids[start:start + n]
        old = by_new_start.get(start)
        start += n
        if old is not None and old.token_ids[1:-1].tolist() == content:
            assert s.chunks[first + i] is old
            continue
        kind = "built"
        if old is not None:
            old_content = old.token_ids[1:-1].tolist()
            prefix, suffix = brute_ends(old_content, content)
            kept = prefix + (suffix if len(old_content) == n else 0)
            if kept >= max(1, n // 8):
                kind = expected_update(model, old, content, prefix, suffix)
                add_macs(expected_macs, kind["macs"])
        if kind == "built":
            model.forward(torch.tensor([CLS, *content, SEP]), torch.arange(n + 2),
                          expected_macs)
        plan.append((first + i, kind))
    assert report.touched == [i for i, _ in plan]
    assert len(report.chunk_updates) == len(plan)
    for (i, kind), update in zip(plan, report.chunk_updates, strict=True):
        assert_chunk_state(model, s.chunks[i])
        if kind == "built":
            assert update.rebuilt and not update.refreshed
            assert update.rows_changed == [len(s.chunks[i].token_ids)] * model.cfg.layers
            assert update.searched == 0
        else:
            assert not update.rebuilt
            assert update.rows_changed == kind["rows_changed"]
            assert (update.searched, update.full_rows, update.rebased) == (
                kind["searched"], kind["full_rows"], kind["rebased"])
    assert {k: v for k, v in report.macs.items()} == expected_macs.as_dict()
    assert_exact(s)
    return report


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_session_edits_keep_update_or_build_chunks_by_the_rule(tokenizer, kind):
    model = MODELS[kind]
    rng = random.Random(21 if kind == "mild" else 22)
    kinds = set()
    for _ in range(6):
        s = DocumentSession(model, tokenizer, words(rng, rng.randint(0, 60)),
                            ChunkPolicy(max_tokens=rng.choice([10, 16])))
        for _ in range(6):
            n = len(s.text)
            at = rng.randint(0, n)
            deleted = rng.randint(0, min(n - at, rng.choice([0, 3, 12, 80])))
            inserted = rng.choice(["", " ", "x", " beta", words(rng, rng.randint(1, 20))])
            report = check_session_edit(
                s, [{"retain": at}, {"delete": deleted}, {"insert": inserted}])
            kinds |= {"rebuilt" if u.rebuilt else "updated" for u in report.chunk_updates}
            kinds |= {"several"} if len(report.touched) > 1 else set()
    assert kinds == {"rebuilt", "updated", "several"}


def test_edit_at_a_chunk_start_updates_that_chunk(tokenizer):
    """An edit starting exactly where a chunk starts: that chunk is the same chunk after the
    edit (its start does not move), updated in place, not rebuilt."""
    model = MODELS["mild"]
    rng = random.Random(5)
    checked = 0
    for _ in range(20):
        s = DocumentSession(model, tokenizer, words(rng, 60), ChunkPolicy(max_tokens=16))
        if len(s.chunks) < 3:
            continue
        k = rng.randrange(1, len(s.chunks) - 1)
        at_token = offsets(s.chunk_lengths)[k]
        at = s.tokens.starts[at_token]
        end = s.tokens.starts[at_token + 1]
        # replace the first word of chunk k by another word (same token count or not)
        report = check_session_edit(
            s, [{"retain": at}, {"delete": end - at}, {"insert": rng.choice(["x ", "beta "])}])
        checked += any(not u.rebuilt for u in report.chunk_updates)
    assert checked >= 5


def test_noop_token_edit_changes_nothing(tokenizer):
    s = DocumentSession(MODELS["mild"], tokenizer, words(random.Random(1), 30),
                        ChunkPolicy(max_tokens=12))
    chunks, lengths, total = list(s.chunks), s.chunk_lengths, s.macs.total
    for start in (0, 5, len(s.tokens.ids)):
        assert s.apply_token_edit(TokenEdit(start, 0, ())) == ([], [])
    assert all(a is b for a, b in zip(s.chunks, chunks, strict=True))
    assert s.chunk_lengths == lengths and s.macs.total == total
    at = s.text.index(" ")
    report = s.apply_ops([{"retain": at}, {"insert": " "}])  # a second space: same tokens
    assert report.touched == [] and report.macs["total"] == 0
    assert_exact(s)


def test_running_sum_is_recomputed_every_256_edits(tokenizer):
    """The document vector is a running sum over chunks (minus the old chunks, plus the new);
    every 256 edits it is recomputed from the chunks, so rounding cannot pile up."""
    model = tiny(0.05, 3, layers=1)
    text = "alpha beta gamma of the 42 x sequential incremental beta gamma alpha of the x 42"
    s = DocumentSession(model, tokenizer, text, ChunkPolicy(max_tokens=8))
    assert len(s.chunks) >= 3

    def recomputed() -> torch.Tensor:
        total = sum((c.pooled * len(c.token_ids) for c in s.chunks),
                    torch.zeros(model.cfg.hidden, dtype=torch.float64))
        return total / (sum(s.chunk_lengths) + 2 * len(s.chunks))

    at = text.index("sequential")
    for i in range(256):
        word = ["gamma", "alpha beta", "x", "incremental"][i % 4]
        s.apply_ops([{"retain": at}, {"delete": s.text.index(" ", at) - at}, {"insert": word}])
        if i == 254:
            assert not torch.equal(s.pooled(), recomputed())  # rounding has piled up
            assert_exact(s)
    assert torch.equal(s.pooled(), recomputed())  # and the 256th edit wiped it
    assert_exact(s)


# ----- update_layer on its own


def test_update_layer_with_nothing_changed_carries_every_row():
    """No row changed and none removed: the state and output carry over as they are, nothing
    is searched or recomputed, no MAC is spent (the branch update_chunk never reaches)."""
    for model in MODELS.values():
        acts = fresh(model, [2001, 2002, 2003, 2004, 2005])
        n = len(acts.token_ids)
        for layer, old in enumerate(acts.layers):
            old_out = acts.layers[layer + 1].x if layer + 1 < len(acts.layers) else acts.out
            macs = MacCounter()
            same_x, rows, none = old.x.clone(), torch.arange(n), torch.zeros(n, dtype=torch.bool)
            with elsewhere_by_default():
                state, out, out_changed, stats = update_layer(model, layer, old, old_out, same_x,
                                                              rows, none, macs)
            for name, t in vars(old).items():
                assert torch.equal(getattr(state, name), t), name
            assert torch.equal(out, old_out)
            assert not out_changed.any()
            assert macs.total == 0 and macs.adds == 0
            assert (stats.changed_in, stats.removed, stats.full_rows, stats.rebased,
                    stats.searched, stats.code_changes, stats.changed_out) == (0,) * 7
            assert math.isinf(stats.min_margin_skipped)


def test_update_layer_equals_the_dense_layer_for_any_row_mapping():
    """update_layer on its own: old rows removed, kept, kept with a new input, new rows
    inserted anywhere (also: only removals, everything changed), against model.layer_dense on
    the new rows; the rows flagged as changed on output are those whose input or code changed."""
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    shapes = {"removed only": 0, "all changed": 0, "mixed": 0}
    for trial in range(60):
        model = MODELS["mild" if trial % 2 else "peaked"]
        layer = trial % model.cfg.layers
        n_old = rng.randint(1, 14)
        x_old = torch.randn(n_old, model.cfg.hidden, generator=gen, dtype=torch.float64)
        old, old_out = model.layer_dense(layer, x_old, MacCounter())
        shape = list(shapes)[trial % 3]
        kept = sorted(rng.sample(range(n_old), rng.randint(0 if shape != "removed only" else 1,
                                                            n_old)))
        if shape == "removed only" and len(kept) == n_old:
            kept = kept[1:] or kept
        src = list(kept)
        if shape != "removed only":
            for _ in range(rng.randint(0 if shape == "mixed" else 1, 4)):
                src.insert(rng.randint(0, len(src)), -1)
        old_src = torch.tensor(src, dtype=torch.long)
        changed = old_src < 0
        for i in range(len(src)):
            if src[i] >= 0 and (shape == "all changed" or rng.random() < 0.3 * (shape == "mixed")):
                changed[i] = True
        new_x = torch.empty(len(src), model.cfg.hidden, dtype=torch.float64)
        new_x[~changed] = x_old[old_src[~changed]]
        new_x[changed] = torch.randn(int(changed.sum()), model.cfg.hidden, generator=gen,
                                     dtype=torch.float64)
        if not len(src):
            continue
        shapes[shape] += 1
        check_layer_update(model, layer, old, old_out, new_x, old_src, changed)
    assert min(shapes.values()) >= 10


def check_layer_update(model, layer, old, old_out, new_x, old_src, changed):
    macs = MacCounter()
    with elsewhere_by_default():
        state, out, out_changed, stats = update_layer(model, layer, old, old_out, new_x,
                                                      old_src, changed, macs)
    ref, ref_out = model.layer_dense(layer, new_x, MacCounter())
    assert_layer_state(model, layer, state, out, ref, ref_out)
    want, want_macs, want_changed = expected_layer(model, layer, old, ref, old_src, changed)
    assert torch.equal(out_changed, want_changed)
    assert {k: getattr(stats, k) for k in want if k != "min_margin_skipped"} == {
        k: v for k, v in want.items() if k != "min_margin_skipped"}
    assert_slack(stats.min_margin_skipped, want["min_margin_skipped"])
    assert macs.as_dict() == want_macs.as_dict()
    return stats


def test_update_layer_recomputes_all_rows_when_correcting_costs_as_much():
    """Terms to correct (removed + changed rows) >= rows: every row is recomputed whole; one
    fewer: the stable rows are corrected instead."""
    model = MODELS["mild"]
    gen = torch.Generator().manual_seed(7)
    x_old = torch.randn(8, model.cfg.hidden, generator=gen, dtype=torch.float64)
    old, old_out = model.layer_dense(0, x_old, MacCounter())
    for n_changed, all_full in ((4, True), (3, False)):
        # rows 0..7 continue old rows 0..7; the last n_changed get a new input (their old
        # terms go out, the new ones come in: 2 * n_changed terms for 8 rows)
        changed = torch.arange(8) >= 8 - n_changed
        new_x = x_old.clone()
        new_x[changed] = torch.randn(n_changed, model.cfg.hidden, generator=gen,
                                     dtype=torch.float64)
        stats = check_layer_update(model, 0, old, old_out, new_x, torch.arange(8), changed)
        assert (stats.full_rows == 8) == all_full
        assert stats.rebased == 0


def test_a_refreshed_chunk_is_reported_rebuilt_and_refreshed(tokenizer):
    """The session's side of a mode's refresh (fast mode: a chunk past its budget is rebuilt
    canonically): the chunk is built, its update says rebuilt and refreshed, and an exact-mode
    rebuild says rebuilt, not refreshed."""
    model = MODELS["mild"]
    text = "alpha beta gamma of the 42 x"
    for mode, refreshed in ((FastModeConfig(refresh_edits=1, refresh_displacement=0), True),
                            ("exact", False)):
        s = DocumentSession(model, tokenizer, text, ChunkPolicy(max_tokens=16), mode=mode)
        report = s.apply_ops([{"retain": 0}, {"delete": len(text)}, {"insert": "sequential"}])
        (update,) = report.chunk_updates
        assert update.rebuilt is True and update.refreshed is refreshed
        assert update.rows_changed == [len(s.chunks[0].token_ids)] * model.cfg.layers
        assert update.searched == 0
