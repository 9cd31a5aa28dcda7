"""Linear layers with float16 weights and float32 arithmetic, for products of a few rows on
the CPU (half_linear.c, compiled at first use by engine.c_kernels).

Why: an update of the fast mode multiplies a few rows per layer, so its time goes into reading
the weight matrices. MiniLM's Q/K/V and feed-forward matrices are 39 MB in float32, more than
the last-level cache of many CPUs (35.8 MB shared on the 2-core Xeon this was measured on):
every update streams them from memory. In float16 they are 19.5 MB and stay in the cache. Unlike
bfloat16 or int8 matmuls, nothing but the stored weights is rounded (to 11 significant bits):
rows, products and sums stay float32, so a row's result never depends on the rows it is batched
with.

Products of more than `KERNEL_ROWS` rows (a chunk build) go to oneDNN with the float32 matrix
packed once (engine.model.packed_linear), where arithmetic, not reading, sets the time; so do
all products where the kernel cannot be compiled, and matrices whose output count is no
multiple of 32 (the kernel's panel width; MiniLM's are 384, 1152 and 1536).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from incstream.engine import c_kernels

SOURCE = Path(__file__).with_name("half_linear.c")
PANEL = 32  # outputs per panel of the float16 layout (half_linear.c's BLOCK)
# At most this many rows per product go through half_linear.c: measured on the Xeon, MiniLM's
# 18 Q/K/V and feed-forward matrices with 1 / 4 / 16 / 32 / 64 / 256 rows took 1.6 / 2.0 / 4.1 /
# 6.8 / 13.3 / 47 ms there against oneDNN's float32 5.0 / 5.0 / 6.5 / 9.0 / 13.6 / 42 ms: reading
# the weights sets the time of a few rows, arithmetic that of many.
KERNEL_ROWS = 48


@dataclass(frozen=True, eq=False)
class HalfWeight:
    """An (out, in) weight matrix in float16 for few-row products, and its float32 version
    (packed for oneDNN where possible) for many-row ones; multiply with `project`
    (engine.model.packed_linear)."""

    # (out / 32, in, 32) float16: panels of 32 outputs, the layout half_linear.c reads; None
    # when `out` is no multiple of 32 (then every product takes `full`)
    panels: torch.Tensor | None
    full: object  # float32 torch.Tensor or packed_linear.PackedWeight, (out, in)
    shape: torch.Size
    dtype: torch.dtype = torch.float32  # what products return

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def declare(lib: ctypes.CDLL) -> None:
    """The C signatures: half_linear (m, N, K, x, w, b, y) -> void; feed_forward_rows (see
    half_linear.c) -> int."""
    lib.half_linear.restype = None
    lib.half_linear.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4
    lib.half_linear_rows_alone.restype = ctypes.c_int
    lib.half_linear_rows_alone.argtypes = []
    lib.feed_forward_rows.restype = ctypes.c_int
    lib.feed_forward_rows.argtypes = ([ctypes.c_int64] * 5 + [ctypes.c_void_p] * 12
                                      + [ctypes.c_float, ctypes.c_void_p])


def _load() -> ctypes.CDLL | None:
    lib = c_kernels.load(SOURCE)
    if lib is not None and lib.half_linear.argtypes is None:
        declare(lib)
    return lib


def _kernel_rows(rows: int, any_rows: bool) -> bool:
    """Whether a product of `rows` rows goes through the kernel. Each row's sums there are
    accumulated alone in a fixed order, so a row's result does not depend on how many rows
    share the call: several small products may share one whatever their total (`any_rows`)."""
    return rows > 0 and (any_rows or rows <= KERNEL_ROWS)


def rows_alone() -> bool:
    """Whether the kernel built here gives a row the same result whatever rows share its call
    (its intrinsic paths do; the plain-C fallback makes no such promise: half_linear.c)."""
    lib = _load()
    return lib is not None and bool(lib.half_linear_rows_alone())


def half_available() -> bool:
    """Whether the float16-weight kernel can run here (builds it the first time)."""
    return _load() is not None


def half_weight(w: torch.Tensor) -> HalfWeight:
    """A float32 CPU matrix as a HalfWeight (the float32 side packed for oneDNN)."""
    from incstream.engine.model.packed_linear import pack

    if w.device.type != "cpu":
        raise ValueError(f"float16-weight products run on the CPU, not {w.device}")
    w32 = w.detach().to(torch.float32).contiguous()
    out_features, in_features = w32.shape
    panels = None
    if out_features % PANEL == 0:
        panels = (w32.to(torch.float16).view(out_features // PANEL, PANEL, in_features)
                  .transpose(1, 2).contiguous())
    return HalfWeight(panels, pack(w32), w32.shape)


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous `dtype` tensor, t itself when it already is one (the kernels run every
    layer of every update: even a no-op cast costs a microsecond there)."""
    return t if t.dtype is dtype and t.is_contiguous() else t.to(dtype).contiguous()


def project_half(x: torch.Tensor, w: HalfWeight, b: torch.Tensor | None,
                 any_rows: bool = False) -> torch.Tensor:
    """x (n, in) @ w.T + b in float32: through half_linear.c for at most KERNEL_ROWS rows (any
    number with `any_rows`: the rows of several small products sharing one call), else
    oneDNN with the float32 matrix."""
    rows = x.shape[0] if x.dim() == 2 else -1
    lib = _load() if w.panels is not None and _kernel_rows(rows, any_rows) else None
    if lib is None:
        from incstream.engine.model.packed_linear import project

        return project(x.to(torch.float32), w.full, b)
    x = _contiguous(x, torch.float32)
    b = None if b is None else _contiguous(b, torch.float32)
    out_features, in_features = w.shape
    y = torch.empty((rows, out_features), dtype=torch.float32)
    lib.half_linear(rows, out_features, in_features, x.data_ptr(), w.panels.data_ptr(),
                    None if b is None else b.data_ptr(), y.data_ptr())
    return y


@dataclass(frozen=True, eq=False)
class FeedForwardRows:
    """One layer's constants for feed_forward_rows, converted and laid out once: an update
    calls the kernel every layer, and converting ten tensors a call cost more than a row's
    arithmetic. `keep` holds the tensors that `pointers` point into."""

    hidden: int
    ffn: int
    heads: int
    codes_per_head: int
    eps: float
    keep: tuple[torch.Tensor, ...]
    # tables, bo, w_up panels, b_up, w_down panels, b_down, ln1_w, ln1_b, ln2_w, ln2_b
    pointers: tuple[int, ...]


def prepare_feed_forward_rows(tables: torch.Tensor, layer: object, heads: int,
                              eps: float) -> FeedForwardRows | None:
    """The constants of the rest of a fast-mode block for `layer` (its float16 feed-forward
    matrices, biases and LayerNorms) with `tables` (H * K, C), the code tables of its
    attention output; None where the kernel does not apply (no compiler, matrices that are
    not HalfWeights with panels)."""
    w_up, w_down = layer.w_up, layer.w_down
    if (not isinstance(w_up, HalfWeight) or not isinstance(w_down, HalfWeight)
            or w_up.panels is None or w_down.panels is None or _load() is None):
        return None
    f32 = torch.float32
    vectors = [t.to(f32).contiguous() for t in (tables, layer.bo, layer.b_up, layer.b_down,
                                                 layer.ln1_w, layer.ln1_b, layer.ln2_w,
                                                 layer.ln2_b)]
    tables32, bo, b_up, b_down, ln1_w, ln1_b, ln2_w, ln2_b = vectors
    keep = (*vectors, w_up.panels, w_down.panels)
    pointers = tuple(t.data_ptr() for t in (tables32, bo, w_up.panels, b_up, w_down.panels,
                                            b_down, ln1_w, ln1_b, ln2_w, ln2_b))
    return FeedForwardRows(w_down.shape[0], w_up.shape[0], heads, tables.shape[0] // heads,
                           eps, keep, pointers)


def feed_forward_rows(x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor,
                      layer: object, eps: float) -> torch.Tensor | None:
    """The rest of a fast-mode block for a few rows in one C call (half_linear.c): the
    attention output of `codes` (m, H) as a sum of rows of `tables` (H * K, C) plus layer.bo,
    then engine.model.minilm.feed_forward_block with layer's float16 feed-forward matrices.
    None where the kernel does not apply (no compiler, matrices that are not HalfWeights with
    panels, more than KERNEL_ROWS rows): then the caller runs the PyTorch version. (The fast
    mode prepares each layer once and calls run_feed_forward_rows.)"""
    prepared = prepare_feed_forward_rows(tables, layer, codes.shape[1], eps)
    return None if prepared is None else run_feed_forward_rows(x, codes, prepared)


def run_feed_forward_rows(x: torch.Tensor, codes: torch.Tensor, prepared: FeedForwardRows,
                          any_rows: bool = False) -> torch.Tensor | None:
    """feed_forward_rows with a layer's prepared constants; None for no rows or more than
    KERNEL_ROWS (unless `any_rows`, as project_half)."""
    rows = x.shape[0]
    if not _kernel_rows(rows, any_rows):
        return None
    x, codes = _contiguous(x, torch.float32), _contiguous(codes, torch.int64)
    if codes.shape != (rows, prepared.heads) or x.shape[1] != prepared.hidden:
        raise ValueError(f"expected x ({rows}, {prepared.hidden}) and codes ({rows}, "
                         f"{prepared.heads}), got {tuple(x.shape)} and {tuple(codes.shape)}")
    out = torch.empty((rows, prepared.hidden), dtype=torch.float32)
    status = _load().feed_forward_rows(
        rows, prepared.hidden, prepared.ffn, prepared.heads, prepared.codes_per_head,
        x.data_ptr(), codes.data_ptr(), *prepared.pointers, prepared.eps, out.data_ptr())
    if status != 0:
        raise MemoryError("feed_forward_rows: out of memory")
    return out
