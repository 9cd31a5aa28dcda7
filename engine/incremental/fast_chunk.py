"""A fast-mode chunk: compact float16 state, and its incremental update after an edit.

What a chunk keeps, per layer and row (engine.incremental.fast_mode explains the dial):
- qkv (n, 3, H, d) float16, the rows' queries, keys and values in one tensor (an update
  splices, converts and writes them together): every other row's new context needs the
  changed rows' keys and values, and the stable rows' queries score the changed keys;
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

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from incstream.engine.incremental import held_attention
from incstream.engine.incremental.chunk_record import ChunkRecord
from incstream.engine.incremental.fast_mode import MAX_POSITIONS, FastModeConfig, FastWeights
from incstream.engine.model.half_linear import KERNEL_ROWS, run_feed_forward_rows
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import embed, feed_forward_block
from incstream.engine.model.packed_linear import project

STORE = torch.float16  # storage dtype of the kept activations; compute is float32
F32 = torch.float32
# Spare rows behind a chunk's Q/K/V on the CPU: an update that inserts tokens moves the rows
# after the edit along inside the same memory instead of copying the whole (n, 3, H, d) tensor
# into a new one each layer (~0.6 ms of a typed word's update on the Xeon). Typing inserts a
# few tokens an edit; 4 rows cost ~220 bytes a token of a full chunk (counted in nbytes).
SPARE_ROWS = 4


@dataclass
class FastLayer:
    # (n, 3, H, d) float16: queries, keys, values; on the CPU the first n rows of a larger
    # buffer (SPARE_ROWS), which the chunk's next update reuses in place (FastSplice)
    qkv: torch.Tensor
    lse: torch.Tensor  # (n, H) float32
    slack: torch.Tensor  # (n, H) float16: how far the context may still move, held
    codes: torch.Tensor  # (n, H) uint8

    @property
    def q(self) -> torch.Tensor:
        return self.qkv[:, 0]

    @property
    def k(self) -> torch.Tensor:
        return self.qkv[:, 1]

    @property
    def v(self) -> torch.Tensor:
        return self.qkv[:, 2]


@dataclass
class FastChunk:
    token_ids: torch.Tensor  # (n,) long, [CLS] ... [SEP]
    position_ids: torch.Tensor  # (n,) long: stable ids, not always 0..n-1
    layers: list[FastLayer]
    out: torch.Tensor  # (n, C) float16, last hidden state
    pooled: torch.Tensor  # (C,) float64 mean of `out` rows
    edits: int = 0  # incremental updates since the chunk was last built canonically
    # An update reuses this chunk's Q/K/V memory for the new chunk (with_room): from then on
    # only the new chunk may be updated. The rest (ids, positions, codes, output, pooled) is
    # never touched, so this chunk still answers and records as before; an update that did
    # not finish leaves it `spent`, and the next edit rebuilds it (FastChunks.start).
    spent: bool = False

    @property
    def displacement(self) -> int:
        """max |position id - canonical index| over rows (derived, never stored: what the
        refresh budget bounds)."""
        return _displacement(self.position_ids)

    def nbytes(self) -> int:
        tensors = [self.token_ids, self.position_ids, self.out, self.pooled]
        for layer in self.layers:
            tensors += [layer.lse, layer.slack, layer.codes]
        qkv = sum(layer.qkv.untyped_storage().nbytes() for layer in self.layers)  # spare too
        return qkv + sum(t.numel() * t.element_size() for t in tensors)


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

def _displacement(position_ids: torch.Tensor) -> int:
    canonical = torch.arange(len(position_ids), device=position_ids.device)
    return int((position_ids - canonical).abs().max())


def _pooled(out: torch.Tensor) -> torch.Tensor:
    return out.to(torch.float64).mean(0)


def _roomy(t: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised (rows, ...) tensor like t, the first rows of a buffer with SPARE_ROWS
    more."""
    return t.new_empty((rows + SPARE_ROWS, *t.shape[1:]))[:rows]


def with_room(t: torch.Tensor) -> torch.Tensor:
    """t (n, ...) as the first n rows of a buffer with SPARE_ROWS more (on the CPU)."""
    if t.device.type != "cpu":
        return t.contiguous()
    return _roomy(t, len(t)).copy_(t)


def splice_in_place(t: torch.Tensor, r0: int, r1: int, m: int) -> torch.Tensor | None:
    """Rows r0..r1 of t replaced by m rows, in t's own buffer: the rows after r1 move to start
    at r0 + m (one memmove); rows r0..r0+m keep whatever was there (they are written by the
    caller). None where the buffer has no room for the new row count (or t is not a CPU
    buffer's leading rows): then the caller copies."""
    if t.device.type != "cpu" or t.storage_offset() != 0 or not t.is_contiguous():
        return None
    n_old = len(t)
    n_new = n_old - (r1 - r0) + m
    row_bytes = t.stride(0) * t.element_size()
    if n_new * row_bytes > t.untyped_storage().nbytes():
        return None
    if r0 + m != r1 and n_old > r1:
        base = t.data_ptr()
        ctypes.memmove(base + (r0 + m) * row_bytes, base + r1 * row_bytes,
                       (n_old - r1) * row_bytes)
    return t.as_strided((n_new, *t.shape[1:]), t.stride())


def _lookup(fw: FastWeights, layer: int, codes: torch.Tensor, macs: MacCounter) -> torch.Tensor:
    """Attention output of rows with these codes (m, H): sum of table rows plus bias (one
    embedding bag per row over the flat table)."""
    m, heads = codes.shape
    macs.add_adds(m * heads * fw.w.config.hidden)
    summed = torch.nn.functional.embedding_bag(codes.long() + fw.code_offsets,
                                               fw.tables_flat[layer], mode="sum")
    return summed + fw.w.layers[layer].bo


def _rest_of_block(fw: FastWeights, layer: int, x: torch.Tensor, codes: torch.Tensor,
                   fused: bool, macs: MacCounter, any_rows: bool = False) -> torch.Tensor:
    """Step 4 for rows x (m, C) whose attention codes are `codes` (m, H): the attention output
    (_lookup) and the rest of the block (feed_forward_block), in one compiled call where
    `fused` and the kernel applies (engine.model.half_linear.run_feed_forward_rows: float16
    matrices, a few rows, or any number with `any_rows`), else in PyTorch. Same MACs either
    way."""
    lw, eps = fw.layers[layer], fw.w.config.layer_norm_eps
    prepared = fw.feed_forward_kernels[layer] if fused and fw.feed_forward_kernels else None
    out = (run_feed_forward_rows(x, codes, prepared, any_rows) if prepared is not None
           else None)
    if out is None:
        return feed_forward_block(lw, x, _lookup(fw, layer, codes, macs), eps, macs)
    m, heads = codes.shape
    macs.add_adds(m * heads * fw.w.config.hidden)
    macs.add("linear", m * (lw.w_up.numel() + lw.w_down.numel()))
    return out


def _code_vectors(fw: FastWeights, layer: int, codes: torch.Tensor) -> torch.Tensor:
    """Codebook vectors of codes (..., H) of every head: (..., H, d)."""
    return torch.nn.functional.embedding(codes.long() + fw.code_offsets, fw.codes_flat[layer])


def _requantize(fw: FastWeights, cfg: FastModeConfig, layer: int, ctx: torch.Tensor,
                old: torch.Tensor, macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for recomputed contexts ctx (U, H, d), with hysteresis; old (U, H): the codes
    they had (-1: none, e.g. inserted rows).

    A held code is replaced only by the nearest code when that is closer by more than tau_l.
    Also returns each pair's slack: how far its context may move before a replacement becomes
    possible, (tau_l + gap(c)) / 2 - |ctx - c| by the triangle inequality (gap(c) = distance
    from c to its nearest other code), and at least `context_tolerance` x the median gap.
    Works head-major, (H, U, ...): one batched matmul per head, no permuted copies.
    """
    u, heads, d = ctx.shape
    tau = cfg.tau * float(fw.gap_median[layer])
    cb = fw.codebooks.codes[layer]  # (H, K, d)
    ctx_h = ctx.transpose(0, 1)  # (H, U, d), a view
    dots = torch.matmul(ctx_h, cb.transpose(1, 2))  # (H, U, K)
    macs.add("codebook_search", u * heads * cb.shape[1] * d)
    # squared distances up to the per-pair constant |ctx|^2, added only where needed
    part = fw.codebooks.sqnorm[layer].unsqueeze(1) - 2.0 * dots  # (H, U, K)
    sq = (ctx_h * ctx_h).sum(-1)  # (H, U)
    best_part, best_code = part.min(-1)
    d_best = (best_part + sq).clamp_min_(0.0).sqrt_()
    old_h = old.t()  # (H, U)
    d_old = (part.gather(-1, old_h.clamp_min(0).unsqueeze(-1)).squeeze(-1) + sq).clamp_min_(
        0.0).sqrt_()
    d_old.masked_fill_(old_h < 0, float("inf"))
    switch = d_old - d_best > tau
    codes = torch.where(switch, best_code, old_h)
    kept = torch.where(switch, d_best, d_old)
    gap = fw.code_gap[layer].gather(1, codes)  # (H, U)
    return codes.t(), _slack(fw, cfg, layer, gap, kept).t()


def _slack(fw: FastWeights, cfg: FastModeConfig, layer: int, gap: torch.Tensor,
           distance: torch.Tensor) -> torch.Tensor:
    """How far a context at `distance` from its code (whose nearest other code is `gap` away)
    may move before hysteresis could replace the code: (tau_l + gap) / 2 - distance by the
    triangle inequality, and at least `context_tolerance` x the layer's median gap."""
    tau = cfg.tau * float(fw.gap_median[layer])
    return ((tau + gap) / 2 - distance).clamp_min_(
        cfg.context_tolerance * float(fw.gap_median[layer]))


def _move_norm(fw: FastWeights, layer: int, w: torch.Tensor, w_sum: torch.Tensor,
               vals: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """|sum_j w_ij v_j - w_sum_i c_i| per head and row, (H, n): how far the keys that left and
    came in pull row i's context from its code vector c_i (w (H, n, J) their signed weights,
    vals (H, J, d) their values, codes (H, n)).

    Expanded into dot products between the J values and the K codes, so that nothing of size
    (n, d) is built (one edit: J is a few keys, n a whole chunk):
    |Wv|^2 - 2 w_sum (Wv . c) + w_sum^2 |c|^2, with Wv . c = sum_j w_ij (v_j . c_i).
    The terms nearly cancel where the move is near zero: an error floor of ~3e-4 x |w_sum c|
    in float32, far below the slack it is charged against (a fraction of a code gap).
    """
    cb = fw.codebooks.codes[layer]  # (H, K, d)
    vv = torch.matmul(vals, vals.transpose(1, 2))  # (H, J, J)
    vc = torch.matmul(cb, vals.transpose(1, 2))  # (H, K, J): v_j . c for every code
    vc_rows = vc.gather(1, codes.unsqueeze(-1).expand(-1, -1, vals.shape[1]))  # (H, n, J)
    wv_sq = (torch.matmul(w, vv) * w).sum(-1)
    wv_c = (w * vc_rows).sum(-1)
    c_sq = fw.codebooks.sqnorm[layer].gather(1, codes)  # (H, n)
    return (wv_sq - 2.0 * w_sum * wv_c + w_sum * w_sum * c_sq).clamp_min_(0.0).sqrt_()


def _qkv(fw: FastWeights, layer: int, x: torch.Tensor, macs: MacCounter,
         any_rows: bool = False) -> torch.Tensor:
    """Q, K, V of rows x (m, C) with one fused matmul, as (m, 3, H, d) float32 (`any_rows`:
    float16 weights take the kernel however many rows: packed_linear.project)."""
    cfg = fw.w.config
    w, b = fw.wqkv[layer]
    macs.add("linear", x.shape[0] * w.shape[0] * w.shape[1])
    return project(x, w, b, any_rows).to(F32).view(-1, 3, cfg.heads, cfg.head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole contexts of queries q (r, H, d) over all keys/values (n, H, d): (lse, ctx), as
    (r, H) and (r, H, d) views of head-major results."""
    r, heads, d = q.shape
    s = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)).mul_(1.0 / math.sqrt(d))  # (H,r,n)
    top = s.amax(-1, keepdim=True)
    e = s.sub_(top).exp_()
    z = e.sum(-1)  # (H, r)
    ctx = torch.matmul(e, v.transpose(0, 1)).div_(z.unsqueeze(-1))  # (H, r, d)
    macs.add("attn_scores", r * k.shape[0] * heads * d)
    macs.add("attn_values", r * k.shape[0] * heads * d)
    return (top.squeeze(-1) + torch.log(z)).t(), ctx.transpose(0, 1)


def _attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """_attend for every row of a chunk at once (a build): on the CPU through PyTorch's fused
    flash attention, which returns the log-sum-exp too (one pass over the keys in blocks, no
    (H, n, n) score matrix written out: ~25 % less time at a chunk's 256 rows); elsewhere
    _attend. Same MACs, same results up to float rounding."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or q.device.type != "cpu" or q.dtype != torch.float32:
        return _attend(q, k, v, macs)
    n, heads, d = q.shape
    out, lse = flash(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                     v.transpose(0, 1).unsqueeze(0), 0.0, False)[:2]  # (1, H, n, d), (1, H, n)
    macs.add("attn_scores", n * k.shape[0] * heads * d)
    macs.add("attn_values", n * k.shape[0] * heads * d)
    return lse[0].t(), out[0].transpose(0, 1)


def build_fast_chunk(fw: FastWeights, cfg: FastModeConfig, token_ids: torch.Tensor,
                     macs: MacCounter) -> FastChunk:
    """A chunk built canonically: positions 0..n-1, nearest codes, nothing held (float32)."""
    mcfg = fw.w.config
    heads = mcfg.heads
    dev = fw.w.device
    ids = token_ids.to(dev)
    n = len(ids)
    pos = torch.arange(n, device=dev)
    x = embed(fw.w, ids, pos)
    layers = []
    none = torch.full((n, heads), -1, dtype=torch.long, device=dev)
    for layer, lw in enumerate(fw.layers):
        qkv = _qkv(fw, layer, x, macs)
        lse, ctx = _attend_chunk(*qkv.unbind(1), macs)
        codes, slack = _requantize(fw, cfg, layer, ctx, none, macs)
        # row-major like every update's state (_attend and _requantize give head-major views,
        # and the compiled held attention reads rows)
        layers.append(FastLayer(with_room(qkv.to(STORE)), with_room(lse),
                                with_room(slack.to(STORE)), codes.to(torch.uint8).contiguous()))
        x = feed_forward_block(lw, x, _lookup(fw, layer, codes, macs), mcfg.layer_norm_eps,
                               macs)
    out = x.to(STORE)
    return FastChunk(ids, pos, layers, out, _pooled(out))


def _held_slack(fw: FastWeights, cfg: FastModeConfig, layer: int, ctx: torch.Tensor,
                codes: torch.Tensor) -> torch.Tensor:
    """The slack (_slack) of contexts ctx (n, H, d) that keep their codes (n, H), as
    _requantize gives a held code."""
    all_heads = torch.arange(ctx.shape[1], device=ctx.device)
    held = _code_vectors(fw, layer, codes)  # (n, H, d)
    gap = fw.code_gap[layer][all_heads, codes]  # (n, H)
    return _slack(fw, cfg, layer, gap, (ctx - held).norm(dim=-1))


def restore_fast_chunk(fw: FastWeights, cfg: FastModeConfig, record: ChunkRecord,
                       cls_id: int, sep_id: int, macs: MacCounter) -> FastChunk:
    """A chunk brought back from its durable record: the record's position ids and codes, and
    everything else recomputed from them in one dense pass (no codebook search). Its codes are
    the record's, so it answers as the chunk it was written from (up to float rounding)."""
    dev = fw.w.device
    ids = torch.tensor([cls_id, *record.content, sep_id], dtype=torch.long, device=dev)
    pos = record.positions.to(device=dev, dtype=torch.long)
    codes = record.codes.to(dev)
    if len(pos) != len(ids) or codes.shape[1] != len(ids):
        raise ValueError(f"record of {len(ids)} rows has {len(pos)} positions and codes for "
                         f"{codes.shape[1]} rows")
    x = embed(fw.w, ids, pos)
    layers = []
    for layer, lw in enumerate(fw.layers):
        qkv = _qkv(fw, layer, x, macs)
        lse, ctx = _attend_chunk(*qkv.unbind(1), macs)
        held = codes[layer].long()
        slack = _held_slack(fw, cfg, layer, ctx, held)
        layers.append(FastLayer(with_room(qkv.to(STORE)), with_room(lse),
                                with_room(slack.to(STORE)), codes[layer].to(torch.uint8)))
        x = feed_forward_block(lw, x, _lookup(fw, layer, held, macs), fw.w.config.layer_norm_eps,
                               macs)
    out = x.to(STORE)
    return FastChunk(ids, pos, layers, out, _pooled(out), edits=record.edits)


def fast_chunk_record(chunk: FastChunk) -> ChunkRecord:
    """The durable part of a fast-mode chunk (engine.incremental.chunk_record)."""
    return ChunkRecord(content=tuple(chunk.token_ids[1:-1].tolist()),
                       positions=chunk.position_ids.to(torch.int16).cpu(),
                       codes=torch.stack([layer.codes for layer in chunk.layers]).cpu(),
                       edits=chunk.edits, displacement=chunk.displacement)


def stable_positions(old_pos: torch.Tensor, r0: int, r1: int, m: int,
                     shift_limit: int) -> tuple[torch.Tensor, int]:
    """Position ids after replacing old rows r0..r1 by m new rows; returns (ids, pushed).

    Kept rows keep their ids. The new rows take ids pL+1, pL+2, ... after their left neighbour
    pL; when that runs into the right neighbour's id, the next at most `shift_limit` kept rows
    are pushed along (they then count as changed), else the new rows share ids with the rows
    after them. `pushed` = how many kept rows after the splice moved.
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
    # No room: the new rows still count up from their left neighbour, sharing ids with the
    # rows after them (each id used about twice) rather than all taking one id.
    return torch.cat([left, wanted.clamp(max=MAX_POSITIONS - 1), right]), 0


def _row_inputs(fw: FastWeights, layers: Sequence[FastLayer], ids: torch.Tensor,
                pos: torch.Tensor, rows: torch.Tensor, upto: int,
                macs: MacCounter) -> torch.Tensor:
    """Input of layer `upto` for these rows, from their tokens, ids and codes below it."""
    x = embed(fw.w, ids[rows], pos[rows])
    for layer in range(upto):  # PyTorch: the reference and the compiled path agree on these
        x = _rest_of_block(fw, layer, x, layers[layer].codes[rows], False, macs)
    return x


class FastSplice:
    """One chunk's fast update in progress, advanced one layer at a time, so that the updates
    of several chunks (of one document or of many) share each layer's matmuls
    (update_fast_chunks). Steps per layer, as in the module docstring:
    `begin_layer` (carry the old state over; False when nothing changed here), then, with the
    Q/K/V of the changed rows, `attend` (steps 2-3; returns the rows that need the rest of
    the block and their codes), then `end_layer` with those rows' outputs (step 4)."""

    def __init__(self, fw: FastWeights, cfg: FastModeConfig, chunk: FastChunk,
                 content: Sequence[int], prefix: int, suffix: int, macs: MacCounter):
        self.fw, self.cfg, self.chunk, self.macs = fw, cfg, chunk, macs
        dev = fw.w.device
        n_old = len(chunk.token_ids)
        r0, r1 = prefix + 1, n_old - 1 - suffix  # old rows r0..r1-1 are replaced
        ins = torch.tensor(list(content[prefix : len(content) - suffix]), dtype=torch.long,
                           device=dev)
        m = len(ins)
        self.r0, self.r1, self.m = r0, r1, m
        self.ids = torch.cat([chunk.token_ids[:r0], ins, chunk.token_ids[r1:]])
        self.pos, pushed = stable_positions(chunk.position_ids, r0, r1, m, cfg.shift_limit)
        self.n = len(self.ids)
        # how far the update leaves a row's id from its canonical index (the refresh budget)
        self.displacement = _displacement(self.pos)
        self.old_src = torch.cat([torch.arange(r0, device=dev),
                                  torch.full((m,), -1, dtype=torch.long, device=dev),
                                  torch.arange(r1, n_old, device=dev)])
        self.deleted = torch.arange(r0, r1, device=dev)  # old rows whose keys leave every layer
        self.s_idx = torch.arange(r0, r0 + m + pushed, device=dev)  # rows whose input changed
        self.x_s = embed(fw.w, self.ids[self.s_idx], self.pos[self.s_idx])
        self.identity = m == r1 - r0  # same row count: old row i is new row i
        self.fused = use_fused_kernel(cfg, dev, fw.w.config.head_dim)
        self.report = FastUpdate()
        self.layers: list[FastLayer] = []
        # old rows whose keys leave every layer from here on: the deleted ones and the kept
        # rows of S (pushed along; `attend` adds the rows whose code flips)
        s_src = self.old_src[self.s_idx]
        self.left = torch.cat([self.deleted, s_src[s_src >= 0]])

    def _splice_rows(self, t: torch.Tensor, room: bool = False) -> torch.Tensor:
        """Old rows (n_old, ...) in the new order: rows before the splice, m placeholder rows,
        rows after it (one cat of slices, cheaper than a gather by index). The placeholders
        are copies of old rows (no zeros to allocate). The inserted rows are in S at every
        layer: `attend`'s pass over all n rows reads their placeholders but its results for S
        are discarded (spent[S] = False, their lse, slack and codes overwritten through u_idx,
        their qkv written first), and `result` writes their output rows; so the values never
        reach the answer (tests/engine/test_fast_mode.py compares with zero placeholders)."""
        filler = t[: self.m] if self.m <= len(t) else t.new_zeros((self.m, *t.shape[1:]))
        parts = [t[: self.r0], filler, t[self.r1 :]]
        if not room or t.device.type != "cpu":
            return torch.cat(parts)
        return torch.cat(parts, out=_roomy(t, self.n))

    def _moved_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The old rows in the new order, in t's own buffer where it has room (splice_in_place;
        the placeholders then hold stale rows, as `_splice_rows` explains), else copied."""
        moved = splice_in_place(t, self.r0, self.r1, self.m)
        return moved if moved is not None else self._splice_rows(t, room=True)

    def begin_layer(self, layer: int) -> bool:
        """Carry layer `layer`'s old state into the new row order; False if no row's input
        changed and no key left (the layer is kept as is)."""
        changed = self.s_idx.shape[0]
        self.report.rows_changed.append(changed)
        old = self.chunk.layers[layer]
        # the keys and values that leave, read before the rows move
        self.kv_left = old.qkv[:, 1:].index_select(0, self.left).to(F32)
        r0, r1, m = self.r0, self.r1, self.m
        self.chunk.spent = True
        codes = old.codes.new_full((self.n, old.codes.shape[1]), -1, dtype=torch.long)
        codes[:r0] = old.codes[:r0]  # the inserted rows r0..r0+m have no code yet (-1)
        codes[r0 + m :] = old.codes[r1:]
        # Q/K/V, lse and slack: the kept rows move inside the old chunk's buffers where they
        # have room (rows of S are overwritten by `attend`), else into new buffers with room
        qkv, lse, slack = (self._moved_rows(t) for t in (old.qkv, old.lse, old.slack))
        self.qkv, self.lse, self.slack, self.codes = qkv, lse, slack, codes
        if changed == 0 and self.left.shape[0] == 0:
            self.layers.append(FastLayer(qkv, lse, slack, codes.to(torch.uint8)))
            return False
        return True

    def attend(self, layer: int, qkv_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3 with the changed rows' Q/K/V (|S|, 3, H, d): returns (inputs, codes) of
        the rows that need the rest of the block (S, and rows whose code flipped)."""
        fw, macs, report, s_idx = self.fw, self.macs, self.report, self.s_idx
        heads, d = fw.w.config.heads, fw.w.config.head_dim
        # The keys and values that came in (the changed rows' new ones) and left (the old ones
        # of the changed and deleted rows).
        kv = torch.cat([qkv_s[:, 1:], self.kv_left])  # (J, 2, H, d)
        j, k_codes = kv.shape[0], fw.codebooks.codes.shape[2]
        if self.fused:
            u_idx, flips, f_idx = self._held_attention_fused(layer, qkv_s, kv)
        else:
            u_idx, flips, f_idx = self._held_attention(layer, qkv_s, kv)
        u, m_s = u_idx.shape[0], s_idx.shape[0]
        macs.add("attn_scores", (self.n - m_s) * j * heads * d)
        # the drift's dot products (_move_norm): values x values, values x codes, rows x J^2
        macs.add("attn_values", heads * (j * j * d + k_codes * j * d + self.n * j * j))
        macs.add("attn_scores", u * self.n * heads * d)
        macs.add("attn_values", u * self.n * heads * d)
        macs.add("codebook_search", u * heads * k_codes * d)
        report.searched += u * heads
        report.full_rows += u
        report.code_flips += flips
        self.layers.append(FastLayer(self.qkv, self.lse, self.slack, self.codes.to(torch.uint8)))
        # 4. The rest of the block runs for S and the rows whose code changed (f_idx).
        x_in = self.x_s
        if f_idx.shape[0]:
            x_f = _row_inputs(fw, self.layers, self.ids, self.pos, f_idx, layer, macs)
            self.s_idx, x_in = torch.cat([s_idx, f_idx]), torch.cat([x_in, x_f])
            self.left = torch.cat([self.left, self.old_src[f_idx]])
        return x_in, self.codes[self.s_idx]

    def _held_attention(self, layer: int, qkv_s: torch.Tensor,
                        kv: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Steps 2-3 in PyTorch (the reference; held_attention.c is the same in one call).
        Updates qkv, lse, slack and codes; returns (u_idx, flips, f_idx): the rows whose
        context was recomputed (S first), how many of them had a held code replaced, and those
        of them outside S."""
        fw, cfg = self.fw, self.cfg
        qkv, lse, codes, s_idx = self.qkv, self.lse, self.codes, self.s_idx
        q_s = qkv_s[:, 0]
        d = fw.w.config.head_dim
        # 2. How far the keys that left and came in moved every other row's context: weights
        #    against the row's stored normaliser, values' offsets from the row's code vector.
        #    Computed for all n rows, head-major (H, n, J): cheaper than gathering the others;
        #    the rows of S get their context recomputed below anyway.
        keys, vals = kv[:, 0], kv[:, 1]  # (J, H, d) each
        w = torch.matmul(qkv[:, 0].to(F32).transpose(0, 1), keys.permute(1, 2, 0)).mul_(
            1.0 / math.sqrt(d))
        w = w.sub_(lse.t().unsqueeze(-1)).exp_()  # (H, n, J)
        w[:, :, len(s_idx):].neg_()  # a key that left takes its mass back
        w_sum = w.sum(-1)  # (H, n)
        move = _move_norm(fw, layer, w, w_sum, vals.transpose(0, 1), codes.clamp_min(0).t())
        drift = move.div_((1.0 + w_sum).clamp_min_(1e-6))  # (H, n)
        slack_f = self.slack.to(F32).sub_(drift.t())
        slack = slack_f.to(STORE)
        # 3. Recompute whole contexts of S and of rows whose slack ran out; re-quantize them.
        spent = (slack_f < 0).any(-1)
        spent[s_idx] = False
        u_idx = torch.cat([s_idx, spent.nonzero().squeeze(1)])
        qkv[s_idx] = qkv_s.to(STORE)
        q_u = torch.cat([q_s, qkv[u_idx[len(s_idx):], 0].to(F32)])
        kv_all = qkv[:, 1:].to(F32)  # (n, 2, H, d)
        lse_u, ctx_u = _attend(q_u, kv_all[:, 0], kv_all[:, 1], MacCounter())
        lse[u_idx] = lse_u
        p_old = codes[u_idx]
        new_codes, new_slack = _requantize(fw, cfg, layer, ctx_u, p_old, MacCounter())
        flipped = ((new_codes != p_old) & (p_old >= 0)).any(-1)
        codes[u_idx] = new_codes
        slack[u_idx] = new_slack.to(STORE)
        self.slack = slack
        m_s = len(s_idx)
        return u_idx, int(flipped.sum()), u_idx[m_s:][flipped[m_s:]]

    def _held_attention_fused(self, layer: int, qkv_s: torch.Tensor,
                              kv: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Steps 2-3 in one call of the compiled CPU kernel (engine.incremental.held_attention),
        same contract as _held_attention (the kernel writes the rows of S into qkv too)."""
        fw, cfg = self.fw, self.cfg
        unit = float(fw.gap_median[layer])
        return held_attention.held_attention(
            self.qkv, qkv_s.contiguous(), kv, self.lse, self.slack, self.codes, self.s_idx,
            fw.codebook_kernels[layer], tau=cfg.tau * unit,
            min_slack=cfg.context_tolerance * unit)

    def end_layer(self, x_out: torch.Tensor) -> None:
        self.x_s = x_out

    def result(self) -> tuple[FastChunk, FastUpdate]:
        chunk, s_idx = self.chunk, self.s_idx
        out = chunk.out.clone() if self.identity else self._splice_rows(chunk.out)
        if s_idx.shape[0]:
            out[s_idx] = self.x_s.to(STORE)
        new = FastChunk(self.ids, self.pos, self.layers, out, _pooled(out),
                        edits=chunk.edits + 1)
        return new, self.report


def use_fused_kernel(cfg: FastModeConfig, device: torch.device, head_dim: int) -> bool:
    """Whether held attention runs as the compiled CPU kernel: dial `kernel` "fused" (an error
    where it cannot), "torch" (never), "auto" (on the CPU, for the head width the kernel is
    compiled for, when it compiles)."""
    if cfg.kernel == "torch":
        return False
    ok = (device.type == "cpu" and head_dim == held_attention.HEAD_DIM
          and held_attention.available())
    if cfg.kernel == "fused" and not ok:
        raise RuntimeError(f"kernel 'fused' runs on the CPU, for heads of width "
                           f"{held_attention.HEAD_DIM}, with a working C compiler (cc or $CC); "
                           f"use kernel 'torch' or 'auto' here")
    return ok


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rows of several splices as one tensor (one splice's as they are: no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def rows_alone_exact(fw: FastWeights, fused: bool) -> bool:
    """Whether the few-row products give each row the result it would get in any other
    company: the float16 kernels, run `fused` (FastWeights.rows_alone). oneDNN's float32 or
    bfloat16 products, int8 and CUDA promise no such thing."""
    return fused and fw.rows_alone


def _shared_calls(sizes: list[int], alone_exact: bool) -> list[tuple[list[int], bool]]:
    """Which splices' rows share one product call, and whether that call takes the kernel
    whatever its rows (`any_rows`). Where rows are alone-exact, the splices small enough to
    take the kernel on their own share one kernel call however many rows that makes, and each
    bigger one (a many-row product: oneDNN) has a call to itself, as it would alone: so every
    splice's numbers are those of running it by itself, whoever shares its step. Otherwise all
    share one call (then float rounding may differ with the company)."""
    if not alone_exact:
        return [(list(range(len(sizes))), False)]
    small = [i for i, rows in enumerate(sizes) if rows <= KERNEL_ROWS]
    big = [([i], False) for i, rows in enumerate(sizes) if rows > KERNEL_ROWS]
    return ([(small, True)] if small else []) + big


def _shared_products(product, parts: list[tuple[torch.Tensor, ...]],
                     alone_exact: bool) -> list[torch.Tensor]:
    """product(*rows, any_rows=...) over each splice's rows `parts[i]` (tensors of equal row
    counts), in the calls _shared_calls picks; the results in the splices' order."""
    sizes = [p[0].shape[0] for p in parts]
    out: list[torch.Tensor] = [parts[0][0]] * len(parts)
    for members, any_rows in _shared_calls(sizes, alone_exact):
        joined = [_joined([parts[i][j] for i in members]) for j in range(len(parts[0]))]
        y = product(*joined, any_rows=any_rows)
        pieces = (y,) if len(members) == 1 else y.split([sizes[i] for i in members])
        for i, piece in zip(members, pieces, strict=True):
            out[i] = piece
    return out


def update_fast_chunks(fw: FastWeights, splices: Sequence[FastSplice]) -> None:
    """Advance several chunk updates together, layer by layer: the Q/K/V projection and the
    feed-forward of all their changed rows go through shared matmuls per layer (what makes a
    batch of edits cheaper than the same edits one at a time; _shared_calls says which share
    and why a document's answer then does not depend on its company). Each splice's MACs go
    to its own counter; read the results with FastSplice.result()."""
    for layer in range(len(fw.layers)):
        active = [sp for sp in splices if sp.begin_layer(layer)]
        if not active:
            continue
        fused = active[0].fused
        alone_exact = rows_alone_exact(fw, fused)
        scratch = MacCounter()
        sizes = [sp.x_s.shape[0] for sp in active]
        qkv = _shared_products(partial(_qkv, fw, layer, macs=scratch),
                               [(sp.x_s,) for sp in active], alone_exact)
        inputs = [sp.attend(layer, qkv_s) for sp, qkv_s in zip(active, qkv, strict=True)]
        x_out = _shared_products(partial(_rest_of_block, fw, layer, fused=fused, macs=scratch),
                                 inputs, alone_exact)
        for sp, x in zip(active, x_out, strict=True):
            sp.end_layer(x)
        # Each splice is charged for its own rows (what the batched matmuls counted in all).
        w_qkv, lw = fw.wqkv[layer][0], fw.layers[layer]
        hidden = fw.w.config.hidden
        for sp, a, (x_in, _) in zip(active, sizes, inputs, strict=True):
            b = x_in.shape[0]
            sp.macs.add("linear", a * w_qkv.numel() + b * (lw.w_up.numel() + lw.w_down.numel()))
            sp.macs.add_adds(b * fw.w.config.heads * hidden)


def update_fast_chunk(fw: FastWeights, cfg: FastModeConfig, chunk: FastChunk,
                      content: Sequence[int], prefix: int, suffix: int,
                      macs: MacCounter) -> tuple[FastChunk, FastUpdate]:
    """Bring a chunk to new `content` (the first `prefix` and last `suffix` content tokens are
    kept) under the fast mode's rules. See the module docstring for the steps."""
    splice = FastSplice(fw, cfg, chunk, content, prefix, suffix, macs)
    update_fast_chunks(fw, [splice])
    return splice.result()
