"""Exact incremental update of one VQ attention block after some rows changed.

Why this works: in an encoder block only attention mixes positions. For every query row i and
head we keep the softmax numerator N_i = sum_j e^(s_ij - m_i) v_j and denominator
D_i = sum_j e^(s_ij - m_i) (float64, m_i a per-row reference fixed when the row was last
computed whole). When the set S of rows whose layer input changed is known:
- rows in S (and inserted rows) get new q, k, v and are recomputed whole;
- every other row subtracts the old terms of the removed/changed keys and adds the new ones,
  O(n |S| d) instead of O(n^2 d) (or everything is recomputed when that is cheaper);
- a row is re-quantized only where its context moved by at least half its margin since it was
  last quantized (triangle inequality: below that the nearest code cannot change, so skipping
  the search is exact);
- the per-position rest of the block (lookup output projection, residual, LN, FFN, LN) is
  recomputed only for rows in S or whose code changed; those rows form S of the next layer.

Drift: N and D live in float64. A row is recomputed whole (its reference m_i rebased) when a
new score exceeds m_i by REBASE_MARGIN (e^x would lose the old terms' precision) or when
subtracting old terms cancels most of D (relative error would grow as D_before / D_after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from incstream.engine.model.codebooks import MARGIN_SLACK
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import feed_forward_block, qkv, softmax_rows
from incstream.engine.model.vq_model import LayerState, VQModel

REBASE_MARGIN = 30.0  # new score above the row reference by more than this -> recompute row
CANCEL_RATIO = 1e-6  # D shrank below this fraction of its old value -> recompute row


@dataclass
class UpdateStats:
    """What one layer update did (for reporting and tests)."""

    changed_in: int = 0  # rows whose input changed (incl. inserted)
    removed: int = 0  # old rows whose terms were subtracted
    full_rows: int = 0  # rows recomputed whole
    rebased: int = 0  # unchanged rows recomputed whole for precision (rebase / cancellation)
    searched: int = 0  # (row, head) pairs searched in the codebook
    code_changes: int = 0  # rows with at least one changed code (not in changed_in)
    changed_out: int = 0  # rows whose output changed
    min_margin_skipped: float = math.inf  # smallest margin/2 - drift among skipped searches


def update_layer(model: VQModel, layer: int, old: LayerState, old_out: torch.Tensor,
                 new_x: torch.Tensor, old_src: torch.Tensor, changed: torch.Tensor,
                 macs: MacCounter) -> tuple[LayerState, torch.Tensor, torch.Tensor, UpdateStats]:
    """Update layer `layer` from `old` to the new rows.

    new_x: (n_new, C) the new layer input; old_src: (n_new,) the old row each new row continues
    (-1 for inserted rows); changed: (n_new,) bool, rows whose input differs from their old row
    (always True for inserted rows). old_out: (n_old, C) the old layer output.
    Returns the new state, the new output (n_new, C), the bool mask of rows whose output
    changed (S of the next layer), and stats.
    """
    cfg = model.cfg
    lw = model.w.layers[layer]
    dev = new_x.device
    n_new = new_x.shape[0]
    heads, d = cfg.heads, cfg.head_dim
    stats = UpdateStats(changed_in=int(changed.sum()))
    inserted = old_src < 0
    stable = ~changed
    a_idx = changed.nonzero().squeeze(1)  # rows whose terms come in
    s_idx = stable.nonzero().squeeze(1)
    src = old_src[s_idx]
    gone = torch.ones(old.x.shape[0], dtype=torch.bool, device=dev)
    gone[src] = False
    r_idx = gone.nonzero().squeeze(1)  # old rows whose terms go out
    stats.removed = len(r_idx)

    # New q, k, v: recomputed for changed rows, carried for stable ones.
    qa, ka, va = qkv(lw, new_x[a_idx], heads, macs)
    q = torch.empty(n_new, heads, d, dtype=new_x.dtype, device=dev)
    k, v = torch.empty_like(q), torch.empty_like(q)
    q[s_idx], k[s_idx], v[s_idx] = old.q[src], old.k[src], old.v[src]
    q[a_idx], k[a_idx], v[a_idx] = qa, ka, va

    m = torch.empty(n_new, heads, dtype=new_x.dtype, device=dev)
    num = torch.empty_like(q)
    den = torch.empty_like(m)
    full = changed.clone()
    n_terms = len(r_idx) + len(a_idx)
    if n_terms and len(s_idx):
        if n_terms >= n_new:
            # Correcting every row costs more than recomputing it: recompute all rows.
            full[:] = True
        else:
            qs = q[s_idx]
            ms = old.m[src]
            s_old = torch.einsum("ihd,jhd->ihj", qs, old.k[r_idx]) / math.sqrt(d)
            s_new = torch.einsum("ihd,jhd->ihj", qs, ka) / math.sqrt(d)
            macs.add("attn_scores", len(s_idx) * n_terms * heads * d)
            e_old = torch.exp(s_old - ms.unsqueeze(-1))
            e_new = torch.exp(s_new - ms.unsqueeze(-1))
            num_s = (old.num[src] - torch.einsum("ihj,jhd->ihd", e_old, old.v[r_idx])
                     + torch.einsum("ihj,jhd->ihd", e_new, va))
            macs.add("attn_values", len(s_idx) * n_terms * heads * d)
            den_old = old.den[src]
            den_s = den_old - e_old.sum(-1) + e_new.sum(-1)
            bad = (den_s < den_old * CANCEL_RATIO) | ~torch.isfinite(den_s)
            if s_new.shape[-1]:
                bad |= s_new.amax(-1) > ms + REBASE_MARGIN
            m[s_idx], num[s_idx], den[s_idx] = ms, num_s, den_s
            full[s_idx[bad.any(-1)]] = True
            stats.rebased = int(bad.any(-1).sum())
    elif len(s_idx):
        m[s_idx], num[s_idx], den[s_idx] = old.m[src], old.num[src], old.den[src]
    f_idx = full.nonzero().squeeze(1)
    stats.full_rows = len(f_idx)
    if len(f_idx):
        m[f_idx], num[f_idx], den[f_idx] = softmax_rows(q[f_idx], k, v, macs)

    # Re-quantize only (row, head) pairs whose context may have crossed a Voronoi boundary.
    codes = torch.empty(n_new, heads, dtype=torch.long, device=dev)
    margin = torch.empty(n_new, heads, dtype=new_x.dtype, device=dev)
    ctx_q = torch.empty_like(q)
    carried = ~inserted
    c_idx = carried.nonzero().squeeze(1)
    csrc = old_src[c_idx]
    codes[c_idx], margin[c_idx], ctx_q[c_idx] = old.codes[csrc], old.margin[csrc], old.ctx_q[csrc]
    search = torch.zeros(n_new, heads, dtype=torch.bool, device=dev)
    search[inserted] = True
    if n_terms:
        ctx_c = num[c_idx] / den[c_idx].unsqueeze(-1)
        drift = (ctx_c - ctx_q[c_idx]).norm(dim=-1)
        slack = margin[c_idx] / 2 - drift
        need = slack <= MARGIN_SLACK
        search[c_idx] = need
        if (~need).any():
            stats.min_margin_skipped = float(slack[~need].min())
    rows, hs = search.nonzero(as_tuple=True)
    stats.searched = len(rows)
    if len(rows):
        ctx_p = num[rows, hs] / den[rows, hs].unsqueeze(-1)
        new_codes, new_margin = model.codebooks.nearest(layer, ctx_p, hs, macs)
        code_moved = torch.zeros(n_new, dtype=torch.bool, device=dev)
        code_moved[rows[new_codes != codes[rows, hs]]] = True
        codes[rows, hs], margin[rows, hs], ctx_q[rows, hs] = new_codes, new_margin, ctx_p
    else:
        code_moved = torch.zeros(n_new, dtype=torch.bool, device=dev)

    # Per-position rest of the block, only where input or codes changed.
    out_changed = changed | code_moved
    stats.code_changes = int((code_moved & ~changed).sum())
    stats.changed_out = int(out_changed.sum())
    p_idx = out_changed.nonzero().squeeze(1)
    u_idx = (~out_changed).nonzero().squeeze(1)
    out = torch.empty_like(new_x)
    out[u_idx] = old_out[old_src[u_idx]]
    if len(p_idx):
        attn = model.attention_output(layer, codes[p_idx], macs)
        out[p_idx] = feed_forward_block(lw, new_x[p_idx], attn, cfg.layer_norm_eps, macs)
    state = LayerState(x=new_x, q=q, k=k, v=v, m=m, num=num, den=den, codes=codes,
                       margin=margin, ctx_q=ctx_q)
    return state, out, out_changed, stats
