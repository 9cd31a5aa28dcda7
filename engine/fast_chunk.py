"""A fast-mode chunk: compact float16 state, and its incremental update after an edit.

What a chunk keeps, per layer and row (engine.fast_mode explains the dial):
- q, k, v (n, H, d) float16: every other row's new context needs the changed rows' keys and
  values, and the stable rows' queries score the changed keys;
- lse (n, H) float32: log of the row's softmax normaliser when its context was last computed,
  so the attention mass a changed key takes or gives back can be priced without the context;
- held (n, H) float16: attention mass of keys changed since the row's context was computed;
- codes (n, H) uint8.
Plus the token ids, position ids and the last layer's output (float16), about 15 KB per token
in all. The layer inputs x are NOT kept: a row whose input changed gets it from the layer below
in the same update; a row whose code flips without its input changing (rare under hysteresis)
re-derives its input from its token, position and its codes in the layers below (the attention
output of a row is a lookup of its codes, the rest of a block is per row).

One update, for a splice of the chunk's content (rows r0..r1 of the old chunk replaced by m new
rows), layer by layer with S = rows whose layer input changed (S_0 = inserted rows, plus the
few rows pushed along to make room for their position ids):
1. q, k, v of S rows; their old keys and those of deleted rows leave, the new ones come in;
2. every other row scores the keys that left and came in (|T| x |S+R| products), adds that
   attention mass to `held`, and recomputes its context only for heads where `held` passed
   the budget; rows in S recompute their context whole;
3. recomputed contexts are re-quantized with hysteresis (a code is replaced only by one closer
   by more than tau_l; the triangle inequality skips the search when no code can be);
4. the rest of the block (lookup, residual, LayerNorm, FFN) runs for S and rows whose code
   changed; they are S of the next layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.fast_mode import MAX_POSITIONS, FastModeConfig, FastWeights
from engine.macs import MacCounter
from engine.minilm import embed, feed_forward_block, qkv

STORE = torch.float16  # storage dtype of the kept activations; compute is float32
F32 = torch.float32


@dataclass
class FastLayer:
    q: torch.Tensor  # (n, H, d) float16
    k: torch.Tensor  # (n, H, d) float16
    v: torch.Tensor  # (n, H, d) float16
    lse: torch.Tensor  # (n, H) float32
    held: torch.Tensor  # (n, H) float16
    codes: torch.Tensor  # (n, H) uint8


@dataclass
class FastChunk:
    token_ids: torch.Tensor  # (n,) long, [CLS] ... [SEP]
    position_ids: torch.Tensor  # (n,) long: stable ids, not always 0..n-1
    layers: list[FastLayer]
    out: torch.Tensor  # (n, C) float16, last hidden state
    pooled: torch.Tensor  # (C,) float64 mean of `out` rows
    edits: int = 0  # incremental updates since the chunk was last built canonically
    displacement: int = 0  # max |position id - canonical index| over rows

    def nbytes(self) -> int:
        tensors = [self.token_ids, self.position_ids, self.out, self.pooled]
        for layer in self.layers:
            tensors += [layer.q, layer.k, layer.v, layer.lse, layer.held, layer.codes]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class FastUpdate:
    """What one fast-mode chunk update did (same fields the benchmarks read from exact mode)."""

    rows_changed: list[int] = field(default_factory=list)  # |S| entering each layer
    searched: int = 0  # (row, head) pairs searched in a codebook
    full_rows: int = 0  # (row, head) contexts recomputed
    code_flips: int = 0  # (row, head) codes replaced under hysteresis
    rebuilt: bool = False
    refreshed: bool = False  # rebuilt because a refresh budget was passed
    rebased: int = 0
    min_skip_slack: float = float("inf")


# ----- pieces shared by the build and the update

def _pooled(out: torch.Tensor) -> torch.Tensor:
    return out.to(torch.float64).mean(0)


def _lookup(fw: FastWeights, layer: int, codes: torch.Tensor, macs: MacCounter) -> torch.Tensor:
    """Attention output of rows with these codes (m, H): sum of table rows plus bias."""
    m, heads = codes.shape
    rows = fw.tables[layer][torch.arange(heads, device=codes.device), codes.long()]
    macs.add_adds(m * heads * fw.w.config.hidden)
    return rows.sum(1) + fw.w.layers[layer].bo


def _nearest(fw: FastWeights, layer: int, ctx: torch.Tensor, heads: torch.Tensor,
             macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code and its distance for P (context, head) pairs: ctx (P, d), heads (P,)."""
    cb = fw.codebooks.codes[layer]  # (H, K, d)
    sq = fw.codebooks.sqnorm[layer]  # (H, K)
    p, d = ctx.shape
    k = cb.shape[1]
    if p >= 4 * cb.shape[0]:
        order = torch.argsort(heads, stable=True)
        counts = torch.bincount(heads, minlength=cb.shape[0]).tolist()
        parts = ctx[order].split(counts)
        dots = torch.empty(p, k, dtype=ctx.dtype, device=ctx.device)
        dots[order] = torch.cat([part @ cb[h].T for h, part in enumerate(parts)])
    else:
        dots = torch.einsum("pd,pkd->pk", ctx, cb[heads])
    macs.add("codebook_search", p * k * d)
    dist2 = sq[heads] - 2.0 * dots + (ctx * ctx).sum(-1, keepdim=True)
    best = dist2.min(-1)
    return best.indices, best.values.clamp_min(0.0).sqrt()


def _requantize(fw: FastWeights, cfg: FastModeConfig, layer: int, ctx: torch.Tensor,
                heads: torch.Tensor, old: torch.Tensor,
                macs: MacCounter) -> tuple[torch.Tensor, int]:
    """Codes for P recomputed contexts with hysteresis; old = previous codes (-1: none).

    A held code c is replaced only by a code closer by more than tau_l. No code can be when
    |ctx - c| <= (tau_l + gap(c)) / 2, gap(c) = distance from c to its nearest other code
    (triangle inequality), so those pairs are not searched. Returns (codes, searched).
    """
    tau = cfg.tau * float(fw.gap_median[layer])
    cb = fw.codebooks.codes[layer]
    has_old = old >= 0
    safe = torch.zeros_like(has_old)
    if has_old.any():
        o_idx = has_old.nonzero().squeeze(1)
        c_old = old[o_idx]
        d_old = (ctx[o_idx] - cb[heads[o_idx], c_old]).norm(dim=-1)
        macs.add("codebook_search", len(o_idx) * ctx.shape[1])
        safe[o_idx] = d_old <= (tau + fw.code_gap[layer, heads[o_idx], c_old]) / 2
    codes = old.clone()
    s_idx = (~safe).nonzero().squeeze(1)
    if len(s_idx):
        best, d_best = _nearest(fw, layer, ctx[s_idx], heads[s_idx], macs)
        prev = old[s_idx]
        keep = prev >= 0
        if keep.any():
            d_prev = (ctx[s_idx] - cb[heads[s_idx], prev.clamp_min(0)]).norm(dim=-1)
            keep &= d_prev - d_best <= tau
        codes[s_idx] = torch.where(keep, prev, best)
    return codes, len(s_idx)


def build_fast_chunk(fw: FastWeights, token_ids: torch.Tensor, macs: MacCounter) -> FastChunk:
    """A chunk built canonically: positions 0..n-1, nearest codes, nothing held (float32)."""
    cfg = fw.w.config
    heads, d = cfg.heads, cfg.head_dim
    dev = fw.w.device
    ids = token_ids.to(dev)
    n = len(ids)
    pos = torch.arange(n, device=dev)
    x = embed(fw.w, ids, pos)
    layers = []
    all_heads = torch.arange(heads, device=dev).repeat(n)
    for layer, lw in enumerate(fw.w.layers):
        q, k, v = qkv(lw, x, heads, macs)
        s = torch.einsum("ihd,jhd->ihj", q, k) / math.sqrt(d)  # (n, H, n)
        macs.add("attn_scores", n * n * heads * d)
        lse = torch.logsumexp(s, -1)
        ctx = torch.einsum("ihj,jhd->ihd", torch.exp(s - lse.unsqueeze(-1)), v)
        macs.add("attn_values", n * n * heads * d)
        codes, _ = _nearest(fw, layer, ctx.reshape(n * heads, d), all_heads, macs)
        codes = codes.view(n, heads)
        layers.append(FastLayer(q.to(STORE), k.to(STORE), v.to(STORE), lse,
                                torch.zeros(n, heads, dtype=STORE, device=dev),
                                codes.to(torch.uint8)))
        x = feed_forward_block(lw, x, _lookup(fw, layer, codes, macs), cfg.layer_norm_eps, macs)
    out = x.to(STORE)
    return FastChunk(ids, pos, layers, out, _pooled(out))


def stable_positions(old_pos: torch.Tensor, r0: int, r1: int, m: int,
                     shift_limit: int) -> tuple[torch.Tensor, int]:
    """Position ids after replacing old rows r0..r1 by m new rows; returns (ids, pushed).

    Kept rows keep their ids. The new rows take ids pL+1, pL+2, ... after their left neighbour
    pL; when that runs into the right neighbour's id, the next at most `shift_limit` kept rows
    are pushed along (they then count as changed), else the new rows squeeze into the free ids
    and duplicate the last one. `pushed` = how many kept rows after the splice moved.
    """
    left, right = old_pos[:r0], old_pos[r1:]
    p_left = int(left[-1])
    wanted = p_left + 1 + torch.arange(m, device=old_pos.device)
    if m == 0:
        return torch.cat([left, right]), 0
    # How many following rows would have to move, and where the last would land.
    need = p_left + m + 1  # smallest id the first kept row after the splice may have
    right_list = right[: shift_limit + 1].tolist()
    pushed = 0
    for p in right_list:
        if p >= need:
            break
        pushed += 1
        need += 1
    fits = pushed <= shift_limit and (pushed < len(right_list) or pushed == len(right))
    if fits and need - 1 < MAX_POSITIONS:
        moved = right.clone()
        if pushed:
            moved[:pushed] = p_left + m + 1 + torch.arange(pushed, device=old_pos.device)
        return torch.cat([left, wanted, moved]), pushed
    top = max(p_left, int(right[0]) - 1)
    return torch.cat([left, wanted.clamp(max=top), right]), 0


def _row_inputs(fw: FastWeights, layers: Sequence[FastLayer], ids: torch.Tensor,
                pos: torch.Tensor, rows: torch.Tensor, upto: int,
                macs: MacCounter) -> torch.Tensor:
    """Input of layer `upto` for these rows, from their tokens, ids and codes below it."""
    eps = fw.w.config.layer_norm_eps
    x = embed(fw.w, ids[rows], pos[rows])
    for layer in range(upto):
        attn = _lookup(fw, layer, layers[layer].codes[rows], macs)
        x = feed_forward_block(fw.w.layers[layer], x, attn, eps, macs)
    return x


def update_fast_chunk(fw: FastWeights, cfg: FastModeConfig, chunk: FastChunk,
                      content: Sequence[int], prefix: int, suffix: int,
                      macs: MacCounter) -> tuple[FastChunk, FastUpdate]:
    """Bring a chunk to new `content` (the first `prefix` and last `suffix` content tokens are
    kept) under the fast mode's rules. See the module docstring for the steps."""
    mcfg = fw.w.config
    heads, d = mcfg.heads, mcfg.head_dim
    scale = 1.0 / math.sqrt(d)
    dev = fw.w.device
    n_old = len(chunk.token_ids)
    r0, r1 = prefix + 1, n_old - 1 - suffix  # old rows r0..r1-1 are replaced
    ins = torch.tensor(list(content[prefix : len(content) - suffix]), dtype=torch.long,
                       device=dev)
    m = len(ins)
    ids = torch.cat([chunk.token_ids[:r0], ins, chunk.token_ids[r1:]])
    pos, pushed = stable_positions(chunk.position_ids, r0, r1, m, cfg.shift_limit)
    n = len(ids)
    old_src = torch.cat([torch.arange(r0, device=dev),
                         torch.full((m,), -1, dtype=torch.long, device=dev),
                         torch.arange(r1, n_old, device=dev)])
    gather = old_src.clamp(min=0)
    deleted = torch.arange(r0, r1, device=dev)  # old rows whose keys leave every layer
    s_idx = torch.arange(r0, r0 + m + pushed, device=dev)  # rows whose input changed
    x_s = embed(fw.w, ids[s_idx], pos[s_idx])
    report = FastUpdate()
    layers: list[FastLayer] = []
    for layer, (old, lw) in enumerate(zip(chunk.layers, fw.w.layers, strict=True)):
        report.rows_changed.append(len(s_idx))
        q, k, v = old.q[gather], old.k[gather], old.v[gather]
        lse, held, codes = old.lse[gather], old.held[gather], old.codes[gather].long()
        codes[old_src < 0] = -1
        s_src = old_src[s_idx]
        left = torch.cat([deleted, s_src[s_src >= 0]])  # old rows whose keys leave
        if len(s_idx) == 0 and len(left) == 0:
            layers.append(FastLayer(q, k, v, lse, held, codes.to(torch.uint8)))
            continue
        q_s, k_s, v_s = qkv(lw, x_s, heads, macs)
        in_s = torch.zeros(n, dtype=torch.bool, device=dev)
        in_s[s_idx] = True
        t_idx = (~in_s).nonzero().squeeze(1)
        # 2. Attention mass the changed keys take from / give to every other row.
        q_t = q[t_idx].to(F32)
        lse_t = lse[t_idx].unsqueeze(-1)
        mass = torch.exp(torch.einsum("thd,shd->ths", q_t, k_s) * scale - lse_t).sum(-1)
        if len(left):
            k_left = chunk.layers[layer].k[left].to(F32)
            mass += torch.exp(torch.einsum("thd,rhd->thr", q_t, k_left) * scale - lse_t).sum(-1)
        macs.add("attn_scores", len(t_idx) * (len(s_idx) + len(left)) * heads * d)
        held_t = held[t_idx].to(F32) + mass
        over = held_t > cfg.attention_budget
        held[t_idx] = held_t.to(STORE)
        q[s_idx], k[s_idx], v[s_idx] = q_s.to(STORE), k_s.to(STORE), v_s.to(STORE)
        k32, v32 = k.to(F32), v.to(F32)
        # Rows in S: whole context.
        sc = torch.einsum("shd,jhd->shj", q_s, k32) * scale
        lse_s = torch.logsumexp(sc, -1)
        ctx_s = torch.einsum("shj,jhd->shd", torch.exp(sc - lse_s.unsqueeze(-1)), v32)
        macs.add("attn_scores", len(s_idx) * n * heads * d)
        macs.add("attn_values", len(s_idx) * n * heads * d)
        lse[s_idx] = lse_s
        held[s_idx] = 0
        # Other rows: only the heads whose held mass passed the budget.
        t_rows, t_heads = over.nonzero(as_tuple=True)
        t_rows = t_idx[t_rows]
        if len(t_rows):
            q_p = q[t_rows, t_heads].to(F32)  # (P, d)
            sp = torch.einsum("pd,jpd->pj", q_p, k32[:, t_heads]) * scale
            lse_p = torch.logsumexp(sp, -1)
            ctx_p = torch.einsum("pj,jpd->pd", torch.exp(sp - lse_p.unsqueeze(-1)),
                                 v32[:, t_heads])
            macs.add("attn_scores", len(t_rows) * n * d)
            macs.add("attn_values", len(t_rows) * n * d)
            lse[t_rows, t_heads] = lse_p
            held[t_rows, t_heads] = 0
        # 3. Re-quantize the recomputed contexts, with hysteresis.
        s_rows = s_idx.repeat_interleave(heads)
        s_heads = torch.arange(heads, device=dev).repeat(len(s_idx))
        p_rows = torch.cat([s_rows, t_rows])
        p_heads = torch.cat([s_heads, t_heads])
        p_ctx = torch.cat([ctx_s.reshape(-1, d)] + ([ctx_p] if len(t_rows) else []))
        p_old = codes[p_rows, p_heads]
        new_codes, searched = _requantize(fw, cfg, layer, p_ctx, p_heads, p_old, macs)
        report.searched += searched
        report.full_rows += len(p_rows)
        flipped = (new_codes != p_old) & (p_old >= 0)
        report.code_flips += int(flipped.sum())
        codes[p_rows, p_heads] = new_codes
        # 4. The rest of the block for S and the rows whose code changed.
        moved = torch.zeros(n, dtype=torch.bool, device=dev)
        moved[p_rows[flipped]] = True
        moved &= ~in_s
        f_idx = moved.nonzero().squeeze(1)
        if len(f_idx):
            x_f = _row_inputs(fw, layers, ids, pos, f_idx, layer, macs)
            s_idx, x_in = torch.cat([s_idx, f_idx]), torch.cat([x_s, x_f])
        else:
            x_in = x_s
        layers.append(FastLayer(q, k, v, lse, held, codes.to(torch.uint8)))
        x_s = feed_forward_block(lw, x_in, _lookup(fw, layer, codes[s_idx], macs),
                                 mcfg.layer_norm_eps, macs)
    out = chunk.out[gather]
    if len(s_idx):
        out[s_idx] = x_s.to(STORE)
    canon = torch.arange(n, device=dev)
    new = FastChunk(ids, pos, layers, out, _pooled(out), edits=chunk.edits + 1,
                    displacement=int((pos - canon).abs().max()))
    return new, report
